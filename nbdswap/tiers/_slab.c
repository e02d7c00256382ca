/* The slab allocator's bookkeeping (nbdswap.tiers.slab.SlabAllocator), in C.
 *
 * Every written page allocates a slot and frees the one it replaces; moving that
 * bookkeeping from Python to C took 11-11.5 % off a write's instructions (issue 7,
 * bench/RESULTS.md), where compiling the Python (Cython, mypyc) had not helped: the
 * cost was in the dict, set and int objects themselves.  Here the state is plain
 * arrays: per slab a class byte, a use count, one byte per slot, and the fullness group
 * it is filed in; per class and fullness group an array of slabs.
 *
 * The size classes are computed in Python (slab.py) and handed over once with
 * configure(), so their rules live in one place.  The caller holds the GIL throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef SOURCE_SHA256 /* setup.py defines it: the SHA-256 of this file */
#define SOURCE_SHA256 ""
#endif

#define SLAB_SIZE 65536
#define GROUPS 4 /* fullness groups per class (slab.FULLNESS_GROUPS) */
#define MAX_CLASSES 256 /* a class is stored in one byte per slab */

/* --- the size classes, from configure() --------------------------------------------- */

static int configured;
static Py_ssize_t max_payload;       /* largest payload of a non-large allocator */
static Py_ssize_t max_large_payload; /* largest payload of a large one */
static uint8_t *class_of_length;     /* [max_large_payload + 1] */
static int class_count;              /* classes 1..class_count (0 is unused) */
static int64_t slot_bytes[MAX_CLASSES];
static int32_t slots_per_slab[MAX_CLASSES];
static int32_t slab_slabs[MAX_CLASSES]; /* 64 KiB slabs one slab of the class spans */
static PyObject *no_space_error;     /* nbdswap.errors.NoSpaceError */

/* --- the allocator --------------------------------------------------------------------- */

typedef struct {
    int32_t *slabs;
    Py_ssize_t len, cap;
} Group;

typedef struct {
    PyObject_HEAD
    Py_ssize_t slab_limit; /* slabs that take new payloads */
    Py_ssize_t nslabs;     /* slabs tracked: more after mark_used() beyond the limit */
    char large; /* a bool */
    PyObject *on_new_slab, *on_empty_slab; /* or NULL */
    uint8_t *classes;      /* per slab (each slab of a span): class, 0 = free */
    uint16_t *used;        /* per slab in use (the first of a span): slots in use */
    uint8_t **slots;       /* per slab in use: one byte per slot, 1 = used; else NULL */
    uint8_t *filed;        /* per slab: 1 + the fullness group it is filed in, 0 = none */
    uint32_t *position;    /* per filed slab: its index in that group */
    Group *groups;         /* [(class_count + 1) * GROUPS], emptiest group first */
    Py_ssize_t free_hint;  /* every slab below it is in use */
    Py_ssize_t slabs_in_use;
    long long blocks, stored_bytes, used_bytes;
} Allocator;

static Group *
groups_of(Allocator *self, int cls)
{
    return self->groups + (Py_ssize_t)cls * GROUPS;
}

static int
group_add(Allocator *self, int cls, int group, Py_ssize_t slab)
{
    Group *g = groups_of(self, cls) + group;
    if (g->len == g->cap) {
        Py_ssize_t cap = g->cap ? 2 * g->cap : 8;
        int32_t *grown = PyMem_Realloc(g->slabs, cap * sizeof(int32_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        g->slabs = grown;
        g->cap = cap;
    }
    self->position[slab] = (uint32_t)g->len;
    g->slabs[g->len++] = (int32_t)slab;
    self->filed[slab] = (uint8_t)(group + 1);
    return 0;
}

/* Take a filed slab out of its group (the last slab of the group fills its place). */
static void
group_remove(Allocator *self, Py_ssize_t slab)
{
    Group *g = groups_of(self, self->classes[slab]) + (self->filed[slab] - 1);
    int32_t last = g->slabs[--g->len];
    g->slabs[self->position[slab]] = last;
    self->position[last] = self->position[slab];
    self->filed[slab] = 0;
}

/* Put a slab with `used` slots in use into the group of its fullness, unless it is full
 * or lies beyond the limit (such a slab only drains). */
static int
file_slab(Allocator *self, Py_ssize_t slab, int cls, Py_ssize_t used)
{
    Py_ssize_t per_slab = slots_per_slab[cls];
    if (used < per_slab && slab + slab_slabs[cls] <= self->slab_limit)
        return group_add(self, cls, (int)(used * GROUPS / per_slab), slab);
    return 0;
}

static int
class_of(Allocator *self, Py_ssize_t length)
{
    Py_ssize_t limit = self->large ? max_large_payload : max_payload;
    if (length > 0 && length <= limit)
        return class_of_length[length];
    PyErr_Format(PyExc_ValueError, "payload length %zd outside 1..%zd", length, limit);
    return -1;
}

/* The slab and slot of `addr` if it is a slot boundary of class `cls`, else -1 with
 * ValueError set.  A span's slots are counted from its first slab. */
static int
slot_of(long long addr, int cls, Py_ssize_t *slab, Py_ssize_t *slot)
{
    long long span_bytes = (long long)slab_slabs[cls] * SLAB_SIZE, offset;
    if (addr >= 0) {
        offset = addr % span_bytes;
        *slab = (Py_ssize_t)(addr / span_bytes) * slab_slabs[cls];
        *slot = (Py_ssize_t)(offset / slot_bytes[cls]);
        if (offset % slot_bytes[cls] == 0 && *slot < slots_per_slab[cls])
            return 0;
    }
    PyErr_Format(PyExc_ValueError, "address %lld is not a slot of class %d", addr, cls);
    return -1;
}

/* Grow a per-slab array of `size`-byte items from `old` to `new` items, zeroed. */
static int
grow_array(void *array, Py_ssize_t old, Py_ssize_t new, size_t size)
{
    char *grown = realloc(*(void **)array, new * size);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(grown + old * size, 0, (new - old) * size);
    *(void **)array = grown;
    return 0;
}

/* Track `slabs` slabs at least (mark_used() records slabs beyond the limit).  On
 * failure the arrays that grew keep their first `nslabs` entries, still valid. */
static int
grow_to(Allocator *self, Py_ssize_t slabs)
{
    Py_ssize_t old = self->nslabs;
    if (slabs <= old)
        return 0;
    if (slabs > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "address beyond the allocator's reach");
        return -1;
    }
    if (grow_array(&self->classes, old, slabs, sizeof(*self->classes)) < 0 ||
        grow_array(&self->used, old, slabs, sizeof(*self->used)) < 0 ||
        grow_array(&self->slots, old, slabs, sizeof(*self->slots)) < 0 ||
        grow_array(&self->filed, old, slabs, sizeof(*self->filed)) < 0 ||
        grow_array(&self->position, old, slabs, sizeof(*self->position)) < 0)
        return -1;
    self->nslabs = slabs;
    return 0;
}

/* A free slab (or the first of `span` free, aligned ones) below the limit, or -1. */
static Py_ssize_t
find_free_slab(Allocator *self, Py_ssize_t span)
{
    if (span == 1) {
        uint8_t *found = NULL;
        if (self->free_hint < self->slab_limit)
            found = memchr(self->classes + self->free_hint, 0, self->slab_limit - self->free_hint);
        self->free_hint = found ? found - self->classes : self->slab_limit;
        return found ? found - self->classes : -1;
    }
    for (Py_ssize_t slab = (self->free_hint + span - 1) / span * span;
         slab + span <= self->slab_limit; slab += span) {
        Py_ssize_t part = 0;
        while (part < span && self->classes[slab + part] == 0)
            part++;
        if (part == span)
            return slab;
    }
    return -1;
}

static int
assign(Allocator *self, Py_ssize_t slab, int cls)
{
    uint8_t *slots = PyMem_Calloc(slots_per_slab[cls], 1);
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(self->classes + slab, cls, slab_slabs[cls]);
    self->slots[slab] = slots;
    self->used[slab] = 0;
    self->slabs_in_use += slab_slabs[cls];
    return 0;
}

/* A new slab for class `cls`, each of its parts accepted by on_new_slab first. */
static Py_ssize_t
new_slab(Allocator *self, int cls)
{
    Py_ssize_t span = slab_slabs[cls], slab = find_free_slab(self, span);
    if (slab < 0) {
        PyErr_SetString(no_space_error, "no free slab");
        return -1;
    }
    for (Py_ssize_t part = slab; self->on_new_slab && part < slab + span; part++) {
        PyObject *result = PyObject_CallFunction(self->on_new_slab, "ni", part, cls);
        if (result == NULL)
            return -1;
        Py_DECREF(result);
    }
    return assign(self, slab, cls) < 0 ? -1 : slab;
}

/* Return an emptied slab to the pool; then on_empty_slab for each of its parts. */
static int
release(Allocator *self, Py_ssize_t slab)
{
    Py_ssize_t span = slab_slabs[self->classes[slab]];
    PyMem_Free(self->slots[slab]);
    self->slots[slab] = NULL;
    memset(self->classes + slab, 0, span);
    self->slabs_in_use -= span;
    if (slab < self->slab_limit && slab < self->free_hint)
        self->free_hint = slab;
    for (Py_ssize_t part = slab; self->on_empty_slab && part < slab + span; part++) {
        PyObject *result = PyObject_CallFunction(self->on_empty_slab, "n", part);
        if (result == NULL)
            return -1;
        Py_DECREF(result);
    }
    return 0;
}

/* Mark a slot of `slab` used by a payload of `length` bytes, and count it. */
static void
take_slot(Allocator *self, Py_ssize_t slab, uint8_t *slot, int cls, Py_ssize_t length)
{
    *slot = 1;
    self->used[slab]++;
    self->blocks++;
    self->stored_bytes += length;
    self->used_bytes += slot_bytes[cls];
}

/* A free slot of `slab` (of class `cls`, filed in no group), which joins the group of
 * its new fullness unless it is full; the slot's address. */
static PyObject *
alloc_in(Allocator *self, Py_ssize_t slab, int cls, Py_ssize_t length)
{
    uint8_t *slots = self->slots[slab];
    uint8_t *free_slot = memchr(slots, 0, slots_per_slab[cls]);
    if (free_slot == NULL) { /* a full slab is filed nowhere: cannot happen */
        PyErr_SetString(PyExc_SystemError, "slab allocator: a full slab was offered");
        return NULL;
    }
    if (file_slab(self, slab, cls, self->used[slab] + 1) < 0)
        return NULL;
    take_slot(self, slab, free_slot, cls, length);
    return PyLong_FromLongLong((long long)slab * SLAB_SIZE + (free_slot - slots) * slot_bytes[cls]);
}

/* The class of a payload of `arg` bytes (its length in `length`), or -1 with an
 * exception set. */
static int
length_class(Allocator *self, PyObject *arg, Py_ssize_t *length)
{
    *length = PyLong_AsSsize_t(arg);
    if (*length == -1 && PyErr_Occurred())
        return -1;
    return class_of(self, *length);
}

/* The (addr, length) arguments of a method (`length_first`: in that order), and the
 * length's class; -1 with an exception set if they are not two valid ones. */
static int
parse_payload(Allocator *self, const char *method, PyObject *const *args, Py_ssize_t nargs,
              int length_first, long long *addr, Py_ssize_t *length, int *cls)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (%zd given)", method, nargs);
        return -1;
    }
    *addr = PyLong_AsLongLong(args[length_first]);
    if (*addr == -1 && PyErr_Occurred())
        return -1;
    *cls = length_class(self, args[!length_first], length);
    return *cls < 0 ? -1 : 0;
}

static PyObject *
Allocator_alloc(Allocator *self, PyObject *arg)
{
    Py_ssize_t length, slab = -1;
    int cls = length_class(self, arg, &length);
    if (cls < 0)
        return NULL;
    Group *groups = groups_of(self, cls);
    for (int group = GROUPS - 1; group >= 0; group--) {
        if (groups[group].len) {
            slab = groups[group].slabs[groups[group].len - 1];
            group_remove(self, slab);
            break;
        }
    }
    if (slab < 0 && (slab = new_slab(self, cls)) < 0)
        return NULL;
    return alloc_in(self, slab, cls, length);
}

static PyObject *
Allocator_free(Allocator *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t slab, slot, length;
    long long addr;
    int cls;
    if (parse_payload(self, "free", args, nargs, 0, &addr, &length, &cls) < 0)
        return NULL;
    if (slot_of(addr, cls, &slab, &slot) < 0)
        return NULL;
    if (slab >= self->nslabs || self->slots[slab] == NULL || self->classes[slab] != cls)
        return PyErr_Format(PyExc_ValueError, "address %lld is not in a slab of class %d", addr, cls);
    if (!self->slots[slab][slot])
        return PyErr_Format(PyExc_ValueError, "double free of address %lld", addr);
    self->slots[slab][slot] = 0;
    self->blocks--;
    self->stored_bytes -= length;
    self->used_bytes -= slot_bytes[cls];
    Py_ssize_t used = --self->used[slab];
    if (self->filed[slab])
        group_remove(self, slab);
    if ((used == 0 ? release(self, slab) : file_slab(self, slab, cls, used)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Allocator_mark_used(Allocator *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t slab, slot, length;
    long long addr;
    int cls;
    if (parse_payload(self, "mark_used", args, nargs, 0, &addr, &length, &cls) < 0)
        return NULL;
    if (slot_of(addr, cls, &slab, &slot) < 0 || grow_to(self, slab + slab_slabs[cls]) < 0)
        return NULL;
    if (self->slots[slab] == NULL || self->classes[slab] != cls) {
        for (Py_ssize_t part = slab; part < slab + slab_slabs[cls]; part++)
            if (self->classes[part])
                return PyErr_Format(PyExc_ValueError,
                                    "address %lld lies in a slab of another class than %d", addr, cls);
        if (assign(self, slab, cls) < 0)
            return NULL;
    }
    if (self->slots[slab][slot])
        return PyErr_Format(PyExc_ValueError, "address %lld is recorded twice", addr);
    take_slot(self, slab, &self->slots[slab][slot], cls, length);
    Py_RETURN_NONE;
}

static PyObject *
Allocator_finish_marking(Allocator *self, PyObject *Py_UNUSED(ignored))
{
    /* Unfiled group by group: a memset of `filed` would touch every page of it. */
    for (Py_ssize_t index = 0; index < (Py_ssize_t)(class_count + 1) * GROUPS; index++) {
        for (Py_ssize_t member = 0; member < self->groups[index].len; member++)
            self->filed[self->groups[index].slabs[member]] = 0;
        self->groups[index].len = 0;
    }
    for (Py_ssize_t slab = 0; slab < self->nslabs; slab++)
        if (self->slots[slab] && file_slab(self, slab, self->classes[slab], self->used[slab]) < 0)
            return NULL;
    Py_RETURN_NONE;
}

static int
any_partial(Allocator *self, int cls, int below)
{
    Group *groups = groups_of(self, cls);
    for (int group = 0; group < below; group++)
        if (groups[group].len)
            return 1;
    return 0;
}

static PyObject *
Allocator_has_room(Allocator *self, PyObject *arg)
{
    Py_ssize_t length;
    int cls = length_class(self, arg, &length);
    if (cls < 0)
        return NULL;
    return PyBool_FromLong(any_partial(self, cls, GROUPS) || find_free_slab(self, slab_slabs[cls]) >= 0);
}

static PyObject *
Allocator_has_partial(Allocator *self, PyObject *arg)
{
    Py_ssize_t length;
    int cls = length_class(self, arg, &length);
    if (cls < 0)
        return NULL;
    return PyBool_FromLong(any_partial(self, cls, GROUPS));
}

/* Whether a payload of class `cls` at `addr` lies in a slab worth emptying: a single
 * slab at most half used, among the emptiest of its class, with other partly used
 * slabs of the class to take its payloads. */
static int
in_sparse_slab(Allocator *self, long long addr, int cls)
{
    if (slab_slabs[cls] != 1 || addr < 0 || addr / SLAB_SIZE >= self->nslabs)
        return 0;
    Py_ssize_t slab = (Py_ssize_t)(addr / SLAB_SIZE), candidates = 0;
    int group = (int)(self->used[slab] * GROUPS / slots_per_slab[cls]);
    if (group > 1 || self->classes[slab] != cls || self->filed[slab] != group + 1 ||
        any_partial(self, cls, group))
        return 0;
    for (int fuller = group; fuller < GROUPS; fuller++)
        candidates += groups_of(self, cls)[fuller].len;
    return candidates > 1;
}

static PyObject *
Allocator_in_sparse_slab(Allocator *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long addr;
    Py_ssize_t length;
    int cls;
    if (parse_payload(self, "in_sparse_slab", args, nargs, 0, &addr, &length, &cls) < 0)
        return NULL;
    return PyBool_FromLong(in_sparse_slab(self, addr, cls));
}

/* (used, -slab) < the other's: slabs rank by fullness, then the lower one first. */
static int
ranks_below(Allocator *self, Py_ssize_t slab, Py_ssize_t other)
{
    return self->used[slab] < self->used[other] ||
           (self->used[slab] == self->used[other] && slab > other);
}

static PyObject *
Allocator_alloc_fuller(Allocator *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long addr;
    Py_ssize_t length;
    int cls;
    if (parse_payload(self, "alloc_fuller", args, nargs, 1, &addr, &length, &cls) < 0)
        return NULL;
    if (!in_sparse_slab(self, addr, cls))
        Py_RETURN_NONE;
    Group *fullest = groups_of(self, cls) + GROUPS - 1;
    while (fullest->len == 0) /* in_sparse_slab found at least two filed slabs */
        fullest--;
    Py_ssize_t target = fullest->slabs[0];
    for (Py_ssize_t index = 1; index < fullest->len; index++)
        if (ranks_below(self, target, fullest->slabs[index]))
            target = fullest->slabs[index];
    if (!ranks_below(self, addr / SLAB_SIZE, target))
        Py_RETURN_NONE;
    group_remove(self, target);
    return alloc_in(self, target, cls, length);
}

/* For tests and diagnostics: per class, per fullness group, the set of slabs filed. */
static PyObject *
Allocator_partial_groups(Allocator *self, void *Py_UNUSED(closure))
{
    PyObject *classes = PyList_New(class_count + 1);
    for (int cls = 0; classes && cls <= class_count; cls++) {
        PyObject *groups = PyList_New(GROUPS);
        if (groups == NULL)
            goto fail;
        PyList_SET_ITEM(classes, cls, groups);
        for (int group = 0; group < GROUPS; group++) {
            PyObject *slabs = PySet_New(NULL);
            if (slabs == NULL)
                goto fail;
            PyList_SET_ITEM(groups, group, slabs);
            Group *g = groups_of(self, cls) + group;
            for (Py_ssize_t index = 0; index < g->len; index++) {
                PyObject *slab = PyLong_FromLong(g->slabs[index]);
                if (slab == NULL || PySet_Add(slabs, slab) < 0) {
                    Py_XDECREF(slab);
                    goto fail;
                }
                Py_DECREF(slab);
            }
        }
    }
    return classes;
fail:
    Py_XDECREF(classes);
    return NULL;
}

static PyObject *
Allocator_slab_usage(Allocator *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *usage = PyDict_New();
    for (Py_ssize_t slab = 0; usage && slab < self->nslabs; slab++) {
        if (self->slots[slab] == NULL)
            continue;
        PyObject *key = PyLong_FromSsize_t(slab);
        PyObject *value = Py_BuildValue("(ii)", self->classes[slab], self->used[slab]);
        if (key == NULL || value == NULL || PyDict_SetItem(usage, key, value) < 0)
            Py_CLEAR(usage);
        Py_XDECREF(key);
        Py_XDECREF(value);
    }
    return usage;
}

static PyObject *
Allocator_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"capacity", "on_new_slab", "on_empty_slab", "large", NULL};
    Py_ssize_t capacity;
    PyObject *on_new_slab = Py_None, *on_empty_slab = Py_None;
    int large = 0;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "slab classes not configured");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|OO$p:SlabAllocator", keywords, &capacity,
                                     &on_new_slab, &on_empty_slab, &large))
        return NULL;
    if (capacity < 0 || capacity / SLAB_SIZE > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "capacity %zd out of range", capacity);
        return NULL;
    }
    Allocator *self = (Allocator *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->slab_limit = capacity / SLAB_SIZE;
    self->large = (char)large;
    self->on_new_slab = on_new_slab == Py_None ? NULL : Py_NewRef(on_new_slab);
    self->on_empty_slab = on_empty_slab == Py_None ? NULL : Py_NewRef(on_empty_slab);
    self->groups = PyMem_Calloc((size_t)(class_count + 1) * GROUPS, sizeof(Group));
    /* Allocated zeroed, so the pages of slabs never used cost no memory. */
    self->classes = calloc(self->slab_limit + 1, 1);
    self->used = calloc(self->slab_limit + 1, sizeof(uint16_t));
    self->slots = calloc(self->slab_limit + 1, sizeof(uint8_t *));
    self->filed = calloc(self->slab_limit + 1, 1);
    self->position = calloc(self->slab_limit + 1, sizeof(uint32_t));
    if (!self->groups || !self->classes || !self->used || !self->slots || !self->filed ||
        !self->position) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->nslabs = self->slab_limit;
    return (PyObject *)self;
}

static int
Allocator_traverse(Allocator *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_new_slab);
    Py_VISIT(self->on_empty_slab);
    return 0;
}

static int
Allocator_clear(Allocator *self)
{
    Py_CLEAR(self->on_new_slab);
    Py_CLEAR(self->on_empty_slab);
    return 0;
}

static void
Allocator_dealloc(Allocator *self)
{
    PyObject_GC_UnTrack(self);
    Allocator_clear(self);
    for (Py_ssize_t slab = 0; self->slots && slab < self->nslabs; slab++)
        PyMem_Free(self->slots[slab]);
    for (Py_ssize_t index = 0; self->groups && index < (Py_ssize_t)(class_count + 1) * GROUPS; index++)
        PyMem_Free(self->groups[index].slabs);
    PyMem_Free(self->groups);
    free(self->classes);
    free(self->used);
    free(self->slots);
    free(self->filed);
    free(self->position);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Allocator_capacity_bytes(Allocator *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong((long long)self->slab_limit * SLAB_SIZE);
}

static PyObject *
Allocator_slab_bytes(Allocator *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong((long long)self->slabs_in_use * SLAB_SIZE);
}

static PyMethodDef Allocator_methods[] = {
    {"alloc", (PyCFunction)Allocator_alloc, METH_O,
     "alloc(length): reserve a slot for a payload of `length` bytes and return its address: in\n"
     "the fullest partly used slab of its class, else in a new one (NoSpaceError if none)."},
    {"free", (PyCFunction)(void (*)(void))Allocator_free, METH_FASTCALL,
     "free(addr, length): give a slot back; ValueError if it is not an allocated slot."},
    {"mark_used", (PyCFunction)(void (*)(void))Allocator_mark_used, METH_FASTCALL,
     "mark_used(addr, length): record an existing payload (the start-up rebuild from the block\n"
     "map).  The slabs join their fullness groups in finish_marking(), once after the last."},
    {"finish_marking", (PyCFunction)Allocator_finish_marking, METH_NOARGS,
     "Sort every slab with free slots into its class's fullness group (after mark_used)."},
    {"has_room", (PyCFunction)Allocator_has_room, METH_O,
     "has_room(length): whether alloc(length) would find a slot."},
    {"has_partial", (PyCFunction)Allocator_has_partial, METH_O,
     "has_partial(length): whether a slab already in use has a free slot for the payload."},
    {"in_sparse_slab", (PyCFunction)(void (*)(void))Allocator_in_sparse_slab, METH_FASTCALL,
     "in_sparse_slab(addr, length): whether the payload lies in a slab worth emptying, as\n"
     "zsmalloc compacts: a single slab at most half used, among the emptiest of its class,\n"
     "which has other partly used slabs to take its payloads (see alloc_fuller)."},
    {"alloc_fuller", (PyCFunction)(void (*)(void))Allocator_alloc_fuller, METH_FASTCALL,
     "alloc_fuller(length, addr): like alloc(), for the payload at `addr` if it lies in a\n"
     "sparse slab, and only in the fullest slab of its class (ties: the lowest), if that one\n"
     "ranks above its own (payloads only move up a total order: no ping-pong); else None."},
    {"slab_usage", (PyCFunction)Allocator_slab_usage, METH_NOARGS,
     "{slab: (class, slots used)} of the slabs in use (a span by its first slab)."},
    {NULL},
};

static PyMemberDef Allocator_members[] = {
    {"blocks", T_LONGLONG, offsetof(Allocator, blocks), READONLY, "Payloads allocated."},
    {"stored_bytes", T_LONGLONG, offsetof(Allocator, stored_bytes), READONLY, "Their lengths, summed."},
    {"used_bytes", T_LONGLONG, offsetof(Allocator, used_bytes), READONLY, "Their slots' sizes, summed."},
    {"slab_limit", T_PYSSIZET, offsetof(Allocator, slab_limit), READONLY, "Slabs that take new payloads."},
    {"large", T_BOOL, offsetof(Allocator, large), READONLY, "Whether payloads above 4096 bytes are taken."},
    {NULL},
};

static PyGetSetDef Allocator_getset[] = {
    {"capacity_bytes", (getter)Allocator_capacity_bytes, NULL, "Bytes new payloads may use.", NULL},
    {"slab_bytes", (getter)Allocator_slab_bytes, NULL,
     "Bytes of the slabs in use (the memory or disk space the tier occupies).", NULL},
    {"partial_groups", (getter)Allocator_partial_groups, NULL,
     "Per class, per fullness group (emptiest first): the set of partly used slabs.", NULL},
    {NULL},
};

static PyTypeObject AllocatorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nbdswap.tiers._slab.SlabAllocator",
    .tp_doc = PyDoc_STR(
        "SlabAllocator(capacity, on_new_slab=None, on_empty_slab=None, *, large=False)\n\n"
        "Allocates slots in capacity // 65536 slabs.  Partially used slabs of a class are kept\n"
        "in fullness groups, and a new payload goes into the fullest one (as zsmalloc does),\n"
        "so sparse slabs drain and are released instead of staying a little used forever.\n\n"
        "on_new_slab(slab, cls) runs before a slab (each slab of a span) is first used for\n"
        "class cls and may raise NoSpaceError to refuse it, before anything is allocated;\n"
        "on_empty_slab(slab) runs after a slab's last slot was freed.  Slabs beyond the\n"
        "capacity (left over from a larger earlier capacity and recorded with mark_used)\n"
        "are used until they drain but never receive new payloads."),
    .tp_basicsize = sizeof(Allocator),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Allocator_new,
    .tp_dealloc = (destructor)Allocator_dealloc,
    .tp_traverse = (traverseproc)Allocator_traverse,
    .tp_clear = (inquiry)Allocator_clear,
    .tp_methods = Allocator_methods,
    .tp_members = Allocator_members,
    .tp_getset = Allocator_getset,
};

/* --- configure ------------------------------------------------------------------------- */

static int
read_table(PyObject *sequence, int64_t *into, int count, const char *name)
{
    for (int cls = 0; cls < count; cls++) {
        PyObject *item = PySequence_GetItem(sequence, cls);
        long long value = item ? PyLong_AsLongLong(item) : -1;
        Py_XDECREF(item);
        if (value == -1 && PyErr_Occurred())
            return -1;
        if (value < 0 || value > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s[%d] = %lld out of range", name, cls, value);
            return -1;
        }
        into[cls] = value;
    }
    return 0;
}

static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *slot_table, *span_table, *per_slab_table, *error;
    Py_buffer lengths;
    Py_ssize_t small;
    int64_t spans[MAX_CLASSES], per_slab[MAX_CLASSES];
    if (configured) {
        PyErr_SetString(PyExc_RuntimeError, "slab classes are configured once");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*OOOnO:configure", &lengths, &slot_table, &span_table,
                          &per_slab_table, &small, &error))
        return NULL;
    if (!PyExceptionClass_Check(error)) {
        PyBuffer_Release(&lengths);
        PyErr_SetString(PyExc_TypeError, "no_space_error must be an exception class");
        return NULL;
    }
    Py_ssize_t count = PySequence_Size(slot_table);
    if (count < 2 || count > MAX_CLASSES || PySequence_Size(span_table) != count ||
        PySequence_Size(per_slab_table) != count || small < 1 || small >= lengths.len) {
        PyBuffer_Release(&lengths);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "inconsistent slab class tables");
        return NULL;
    }
    if (read_table(slot_table, slot_bytes, (int)count, "slot_bytes") < 0 ||
        read_table(span_table, spans, (int)count, "slab_slabs") < 0 ||
        read_table(per_slab_table, per_slab, (int)count, "slots_per_slab") < 0) {
        PyBuffer_Release(&lengths);
        return NULL;
    }
    for (Py_ssize_t cls = 1; cls < count; cls++) {
        if (!slot_bytes[cls] || !spans[cls] || !per_slab[cls] || per_slab[cls] > UINT16_MAX ||
            per_slab[cls] * slot_bytes[cls] > spans[cls] * SLAB_SIZE) {
            PyBuffer_Release(&lengths);
            PyErr_Format(PyExc_ValueError, "slab class %zd is inconsistent", cls);
            return NULL;
        }
        slab_slabs[cls] = (int32_t)spans[cls];
        slots_per_slab[cls] = (int32_t)per_slab[cls];
    }
    class_of_length = PyMem_Malloc(lengths.len);
    if (class_of_length == NULL) {
        PyBuffer_Release(&lengths);
        return PyErr_NoMemory();
    }
    memcpy(class_of_length, lengths.buf, lengths.len);
    PyBuffer_Release(&lengths);
    for (Py_ssize_t length = 1; length < lengths.len; length++) {
        if (class_of_length[length] == 0 || class_of_length[length] >= count ||
            slot_bytes[class_of_length[length]] < length) {
            PyErr_Format(PyExc_ValueError, "length %zd has no class that holds it", length);
            PyMem_Free(class_of_length);
            class_of_length = NULL;
            return NULL;
        }
    }
    max_payload = small;
    max_large_payload = lengths.len - 1;
    class_count = (int)count - 1;
    no_space_error = Py_NewRef(error);
    configured = 1;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(class_of_length, slot_bytes, slab_slabs, slots_per_slab, max_payload,\n"
     "no_space_error): the size classes (per payload length 0..max large payload, and per\n"
     "class 0..last) and the exception a full allocator raises.  Once, before any allocator."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nbdswap.tiers._slab",
    .m_doc = "The slab allocator's bookkeeping in C (see nbdswap.tiers.slab).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__slab(void)
{
    if (PyType_Ready(&AllocatorType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddObjectRef(m, "SlabAllocator", (PyObject *)&AllocatorType) < 0 ||
              PyModule_AddIntConstant(m, "SLAB_SIZE", SLAB_SIZE) < 0 ||
              PyModule_AddIntConstant(m, "FULLNESS_GROUPS", GROUPS) < 0 ||
              PyModule_AddStringConstant(m, "SOURCE_SHA256", SOURCE_SHA256) < 0))
        Py_CLEAR(m);
    return m;
}
