"""The packed bookkeeping of grouped payloads against a plain dict model."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from nbdswap.blockmap import ADDR_LIMIT, TIER_DISK, TIER_RAM, TIER_REMOTE
from nbdswap.grouped_payloads import GroupedPayloads, Share

TIERS, ADDRESSES = (TIER_RAM, TIER_DISK, TIER_REMOTE), (0, 4096, ADDR_LIMIT - 64)
slots = st.tuples(st.sampled_from(TIERS), st.sampled_from(ADDRESSES))
operations = st.lists(st.one_of(
    st.tuples(st.just("hold"), slots, st.sampled_from([1, 4097, 32768]), st.sampled_from([0, 7, (1 << 40) - 1])),
    st.tuples(st.just("release"), slots, st.integers(1, 20)),
    st.tuples(st.just("pages"), slots, st.integers(0, 16)),
), max_size=60)


@given(operations)
def test_every_field_survives_the_packing(ops):
    payloads, model = GroupedPayloads(), {}
    for op, slot, *args in ops:
        share = model.get(slot)
        if op == "hold":
            length, group = args
            assert payloads.hold(slot, length, group) is (share is None)
            model[slot] = Share(1, length, group, 0) if share is None else share._replace(references=share.references + 1)
        elif op == "release":
            left = payloads.release(slot, args[0])
            if share is None or share.references < args[0]:
                assert left is None
            elif share.references == args[0]:
                assert left == 0
                del model[slot]
            else:
                assert left == share.references - args[0]
                model[slot] = share._replace(references=left)
        else:
            payloads.set_pages(slot, args[0])
            if share is not None:
                model[slot] = share._replace(pages=args[0])
        assert dict(payloads.items()) == model and len(payloads) == len(model)
        assert all((slot in payloads) == (slot in model) and payloads.get(slot) == model.get(slot)
                   for slot in itertools.product(TIERS, ADDRESSES))


def test_many_references():
    payloads = GroupedPayloads()
    for _ in range(1000):
        payloads.hold((TIER_DISK, 64), 5000, 3)
    assert payloads.get((TIER_DISK, 64)) == Share(1000, 5000, 3, 0)
    assert payloads.release((TIER_DISK, 64), 1000) == 0 and len(payloads) == 0
