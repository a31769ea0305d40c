import itertools

import pytest
import torch

import experiment as E


@pytest.mark.parametrize("op,fn", [
    ("x_plus_y", lambda a, b, p: (a + b) % p),
    ("x_minus_y", lambda a, b, p: (a - b) % p),
    ("x_div_y", lambda a, b, p: next(c for c in range(p) if (c * b) % p == a)),
])
def test_modular_labels(op, fn):
    p = 13
    task = E.make_task(op, p)
    second = range(1, p) if op == "x_div_y" else range(p)
    assert len(task.y) == p * len(second)
    for row in range(len(task.y)):
        a, b = int(task.a[row]), int(task.b[row])
        assert task.elements[int(task.y[row])] == fn(a, b, p)
        assert task.x[row].tolist() == [a + 2, 0, b + 2, 1]
    assert task.n_vocab == p + 2 and task.n_classes == p


def test_division_labels_at_default_p():
    task = E.make_task("x_div_y", 97)
    assert int(task.b.min()) == 1
    assert torch.equal((task.y * task.b) % 97, task.a)


@pytest.mark.parametrize("k", [3, 5])
def test_permutation_labels_are_compositions(k):
    task = E.make_task("permutation", perm_k=k)
    perms = list(itertools.permutations(range(k)))
    assert task.elements == perms and task.n_classes == len(perms)
    assert len(task.y) == len(perms) ** 2
    rows = range(len(task.y)) if k == 3 else torch.randperm(len(task.y), generator=torch.Generator().manual_seed(0))[:2000]
    for row in rows:
        a, b = perms[int(task.a[row])], perms[int(task.b[row])]
        assert task.elements[int(task.y[row])] == tuple(a[b[i]] for i in range(k))


def test_s5_composition_is_not_commutative():
    task = E.make_task("permutation")
    n = task.n_classes
    table = task.y.view(n, n)
    assert not torch.equal(table, table.T)
    identity = task.elements.index(tuple(range(5)))
    assert torch.equal(table[identity], torch.arange(n)) and torch.equal(table[:, identity], torch.arange(n))


def test_split_is_disjoint_complete_and_seeded():
    train, val = E.split_pairs(1000, 0.5, seed=0)
    assert len(train) == 500 and len(val) == 500
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    again, _ = E.split_pairs(1000, 0.5, seed=0)
    other, _ = E.split_pairs(1000, 0.5, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_seeds_are_distinct_per_purpose():
    seeds = E.derived_seeds(0)
    assert len(set(seeds.values())) == 3
    assert E.derived_seeds(1) != seeds

