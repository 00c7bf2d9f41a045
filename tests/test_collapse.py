"""The collapse detector on stored codes: one code for everything, one dominant code,
and healthy codes (including one perfect code per class) that must not be flagged."""
import numpy as np
import pytest
import torch

from common.code_store import CodeStore
from common.collapse import code_collapse


def _entry(image, text, labels):
    store = CodeStore()
    return store.add(0, torch.as_tensor(image), torch.as_tensor(text), torch.as_tensor(labels))


def _random_codes(n, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, bits), generator=g) * 2 - 1


def _multi_labels(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, classes, generator=g) < 0.3).float()


def test_all_codes_equal_is_collapse():
    labels = _multi_labels(100, 8, 0)
    ones = torch.ones(100, 16, dtype=torch.int64)
    found = code_collapse(_entry(ones, _random_codes(100, 16, 1), labels))
    assert [c.modality for c in found] == ["image"]
    assert found[0].distinct == 1 and found[0].share == 1.0 and found[0].size == 100
    assert "collapsed" in found[0].message() and "task 1 image" in found[0].message()


def test_one_dominant_code_is_collapse_and_threshold_applies():
    labels = _multi_labels(200, 8, 2)
    codes = _random_codes(200, 16, 3)
    codes[:140] = codes[0]  # 70% share one pattern
    assert [c.modality for c in code_collapse(_entry(codes, codes, labels))] == ["image", "text"]
    assert code_collapse(_entry(codes, codes, labels), max_share=0.8) == []
    with pytest.raises(ValueError, match="max_share"):
        code_collapse(_entry(codes, codes, labels), max_share=1.0)


def test_healthy_codes_are_not_flagged():
    labels = _multi_labels(300, 8, 4)
    assert code_collapse(_entry(_random_codes(300, 16, 5), _random_codes(300, 16, 6), labels)) == []
    # two single-label classes, 70 / 30, coded perfectly: one code per class is right
    y = torch.tensor([0] * 70 + [1] * 30)
    labels = torch.nn.functional.one_hot(y, 2).float()
    per_class = torch.where(y[:, None] == 0, torch.ones(100, 16), -torch.ones(100, 16)).long()
    assert code_collapse(_entry(per_class, per_class, labels)) == []
    # ... but one code for both classes is a collapse
    assert len(code_collapse(_entry(torch.ones(100, 16).long(), per_class, labels))) == 1
    assert code_collapse(_entry(np.ones((1, 8)), np.ones((1, 8)), np.ones((1, 2)))) == []


def test_a_code_for_the_dominant_label_of_a_long_tail_is_not_collapse():
    # 60 % of the samples carry label 0 (COCO's person) with varied other labels; one
    # code for exactly those samples is a class code, one code for 60 % of random
    # samples is not
    g = torch.Generator().manual_seed(7)
    labels = (torch.rand(500, 8, generator=g) < 0.2).float()
    labels[:, 0] = 0
    labels[:300, 0] = 1
    codes = _random_codes(500, 16, 8)
    person = codes.clone()
    person[:300] = person[0]
    assert code_collapse(_entry(person, person, labels)) == []
    mixed = codes.clone()
    mixed[100:400] = mixed[100]  # half of them without label 0
    assert [c.modality for c in code_collapse(_entry(mixed, mixed, labels))] == ["image", "text"]
    assert code_collapse(_entry(mixed, mixed, labels), coherence=0.6) == []
    with pytest.raises(ValueError, match="coherence"):
        code_collapse(_entry(mixed, mixed, labels), coherence=0.0)
