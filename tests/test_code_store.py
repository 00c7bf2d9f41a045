"""The code store: packing, per-task lengths, prefix truncation, persistence."""
import numpy as np
import pytest
import torch

from common.code_store import CodeStore, pack_codes, unpack_codes


def rand_codes(n, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, bits), generator=g) * 2 - 1).to(torch.int8)


@pytest.mark.parametrize("bits", [1, 7, 8, 13, 16, 64, 67])
def test_pack_roundtrip_msb_first(bits):
    c = rand_codes(9, bits)
    packed = pack_codes(c)
    assert packed.dtype == np.uint8 and packed.shape == (9, (bits + 7) // 8)
    assert torch.equal(unpack_codes(packed, bits), c)
    # most significant bit first: bit 0 of the code is the top bit of byte 0
    assert np.array_equal(packed[:, 0] >> 7, (c[:, 0] > 0).numpy().astype(np.uint8))


def test_tasks_keep_their_own_length_and_truncate_to_prefix():
    store = CodeStore()
    a, b = rand_codes(5, 12, 1), rand_codes(4, 20, 2)
    labels = torch.eye(5)[:, :3]
    store.add(0, a, -a, labels)
    store.add(1, b, b, torch.ones(4, 3))
    assert store.bits() == {0: 12, 1: 20}
    assert store.num_items() == 9
    assert torch.equal(store.get(0).codes("image"), a)
    assert torch.equal(store.get(0).codes("text"), -a)
    assert torch.equal(store.get(1).codes("image", bits=12), b[:, :12])  # a prefix, not a re-encoding
    with pytest.raises(ValueError, match="cannot read 21"):
        store.get(1).codes("image", bits=21)
    assert [e.task for e in store.entries()] == [0, 1]


def test_joint_mode_replaces_a_task():
    store = CodeStore()
    store.add(0, rand_codes(3, 8), rand_codes(3, 8), torch.ones(3, 2))
    new = rand_codes(3, 8, 5)
    store.add(0, new, new, torch.ones(3, 2))
    assert len(store) == 1 and torch.equal(store.get(0).codes("image"), new)


def test_save_load_roundtrip(tmp_path):
    store = CodeStore()
    store.add(0, rand_codes(5, 12, 1), rand_codes(5, 12, 3), torch.eye(5)[:, :4], ids=[f"img{i}" for i in range(5)])
    store.add(2, rand_codes(4, 20, 2), rand_codes(4, 20, 4), torch.ones(4, 4))
    path = tmp_path / "codes.npz"
    store.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["codes.npz"]  # no temporary file left behind
    back = CodeStore.load(path)
    assert back.tasks() == [0, 2] and back.bits() == store.bits()
    for t in (0, 2):
        for m in ("image", "text"):
            assert torch.equal(back.get(t).codes(m), store.get(t).codes(m))
        assert np.array_equal(back.get(t).labels, store.get(t).labels)
    assert back.get(0).ids == tuple(f"img{i}" for i in range(5))



def test_file_numbers_tasks_from_1_and_the_0_based_layout_still_loads(tmp_path):
    """codes.npz names task 1 ``t1_*`` (user-facing numbering); a file of the earlier
    layout (``t0_*``, no ``task_base``) reads back to the same store."""
    store = CodeStore()
    store.add(0, rand_codes(5, 12, 1), rand_codes(5, 12, 3), torch.eye(5)[:, :4], ids=[f"img{i}" for i in range(5)])
    store.add(1, rand_codes(4, 20, 2), rand_codes(4, 20, 4), torch.ones(4, 4))
    store.save(tmp_path / "codes.npz")
    with np.load(tmp_path / "codes.npz") as data:
        assert data["tasks"].tolist() == [1, 2] and int(data["task_base"]) == 1
        assert {"t1_image", "t1_text", "t1_labels", "t1_ids", "t1_bits", "t2_image"} <= set(data.files)
        assert not any(k.startswith("t0_") for k in data.files)
        assert int(data["t2_bits"]) == 20
    old = {"tasks": np.array([0, 1])}
    for t, e in enumerate(store.entries()):
        old.update({f"t{t}_bits": np.array(e.bits), f"t{t}_image": e.image, f"t{t}_text": e.text,
                    f"t{t}_labels": e.labels, f"t{t}_ids": np.array(e.ids, dtype=str)})
    np.savez(tmp_path / "old.npz", **old)
    back = CodeStore.load(tmp_path / "old.npz")
    assert back.tasks() == [0, 1] and back.bits() == {0: 12, 1: 20}
    for t in (0, 1):
        assert torch.equal(back.get(t).codes("text"), store.get(t).codes("text"))
    assert back.get(0).ids == store.get(0).ids

def test_bad_input_refused(tmp_path):
    store = CodeStore()
    with pytest.raises(ValueError, match="differ in shape"):
        store.add(0, rand_codes(3, 8), rand_codes(3, 9), torch.ones(3, 2))
    with pytest.raises(ValueError, match="labels for"):
        store.add(0, rand_codes(3, 8), rand_codes(3, 8), torch.ones(4, 2))
    with pytest.raises(KeyError, match="no stored codes for task 7"):
        store.get(7)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable code store"):
        CodeStore.load(bad)
    with pytest.raises(FileNotFoundError, match="no code store there"):
        CodeStore.load(tmp_path / "missing.npz")
