"""The op registry: what an op is, the task tensors built from it, and its cyclic coordinates.

experiment.py defines the ops (register_op); plot.py reads them through experiment.OPS.
"""

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

TOKEN_OFFSET = 2  # with the op token: vocabulary ["o", "="] + the elements, element i is token i + 2


@dataclass(frozen=True)
class Op:
    """An algorithmic task over a finite set of elements.

    table(p, perm_k) -> (elements, a, b, y): the elements (a list; class i is elements[i]) and, for every pair,
      the left and right operands' and the answer's element indices, int64 tensors of one length.
    cycle(n_elements) -> (sign, order) for an op on a cyclic group: `order` lists element indices in group order,
      and the answer's position is position(a) + sign * position(b) modulo len(order); None for other ops. The
      Fourier measures and the ring colours need it.
    """

    name: str
    formula: str  # for people: "(x + y) mod p"
    table: Callable
    cycle: Callable | None = None
    prime: bool = False  # needs a prime p (division)


@dataclass
class Task:
    """Every pair of one op as tensors. Row i of x/y is pair (a[i], b[i])."""

    op: str
    x: torch.Tensor  # (n_pairs, 4) int64 tokens [a, "o", b, "="], or (n_pairs, 3) [a, b, "="] without the op token
    y: torch.Tensor  # (n_pairs,) int64 answer class
    a: torch.Tensor  # (n_pairs,) index of the left operand among the elements
    b: torch.Tensor  # (n_pairs,) index of the right operand among the elements
    n_vocab: int
    n_classes: int
    elements: list  # class index -> element (int residue or permutation tuple)
    offset: int = TOKEN_OFFSET  # token id of element 0: element i is token i + offset


def build_task(op: Op, p: int, perm_k: int, op_token: bool = True) -> Task:
    """Every pair of op. With op_token the input is [a, "o", b, "="] over ["o", "="] + the elements (the
    template's); without, [a, b, "="] over the elements + ["="] (Nanda et al. 2023's: vocabulary n + 1)."""
    elements, a, b, y = op.table(p, perm_k)
    assert a.shape == b.shape == y.shape and a.dtype == y.dtype == torch.int64, f"{op.name}: a, b, y must match"
    n = len(elements)
    if op_token:
        x = torch.stack([a + TOKEN_OFFSET, torch.zeros_like(a), b + TOKEN_OFFSET, torch.ones_like(a)], dim=1)
        return Task(op.name, x, y, a, b, n_vocab=n + TOKEN_OFFSET, n_classes=n, elements=elements)
    x = torch.stack([a, b, torch.full_like(a, n)], dim=1)
    return Task(op.name, x, y, a, b, n_vocab=n + 1, n_classes=n, elements=elements, offset=0)


# ----------------------------------------------------------------------------- building blocks for ops
def modular(formula: Callable, b_from: int = 0) -> Callable:
    """table of an op on residues mod p: formula(a, b, p) on int64 tensors, reduced mod p; b runs from b_from."""
    def table(p, perm_k):
        a, b = torch.meshgrid(torch.arange(p), torch.arange(b_from, p), indexing="ij")
        a, b = a.reshape(-1), b.reshape(-1)
        return list(range(p)), a, b, formula(a, b, p) % p

    return table


def inverses(p: int) -> torch.Tensor:
    """(p,) multiplicative inverse of each residue mod a prime p (0 -> 0)."""
    return torch.tensor([pow(int(v), p - 2, p) for v in range(p)])


def permutation_group(formula: Callable) -> Callable:
    """table of an op on S_k: formula(pa, pb) on (n, k) tensors of permutations -> (n, k) permutations."""
    def table(p, perm_k):
        elements = list(itertools.permutations(range(perm_k)))
        perms = torch.tensor(elements)  # (n, k)
        n = len(elements)
        a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        a, b = a.reshape(-1), b.reshape(-1)
        result = formula(perms[a], perms[b])
        # Rank of each permutation in lexicographic order (= its index in `elements`).
        radix = torch.tensor([math.factorial(perm_k - 1 - i) for i in range(perm_k)])
        smaller_later = (result.unsqueeze(2) > result.unsqueeze(1)).triu(1).sum(2)  # (n*n, k)
        return elements, a, b, (smaller_later * radix).sum(1)

    return table


def compose(pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """(a o b)[i] = a[b[i]], row by row."""
    return torch.gather(pa, 1, pb)


def additive(sign: int) -> Callable:
    """cycle of an op that adds (sign 1) or subtracts (-1) residues: the residues in their own order."""
    return lambda n: (sign, list(range(n)))


def in_residue_order(op: Op, n: int) -> bool:
    """Whether the op's cycle is the residues in their own order (an op that adds or subtracts them): the token
    embedding's rows of the residues are then its ring, as the fourier plugin reads them."""
    return op.cycle is not None and op.cycle(n)[1] == list(range(n))


def adds(op: Op, n: int) -> bool:
    """Whether the op adds residues (its cycle in their own order, sign +1): a + b = c + d closes a parallelogram,
    what RQI counts."""
    return in_residue_order(op, n) and op.cycle(n)[0] == 1


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


def primitive_root(p: int) -> int:
    """The smallest generator of the multiplicative group mod a prime p."""
    factors = {q for q in range(2, p) if (p - 1) % q == 0 and is_prime(q)}
    return next(g for g in range(2, p) if all(pow(g, (p - 1) // q, p) != 1 for q in factors))


def multiplicative(sign: int) -> Callable:
    """cycle of an op that multiplies (1) or divides (-1) nonzero residues mod a prime: the powers g^0 .. g^(p-2)
    of a primitive root (discrete logarithms); pairs with a 0 have no coordinates."""
    def cycle(p):
        g = primitive_root(p)
        return sign, [pow(g, t, p) for t in range(p - 1)]

    return cycle


def cyclic_coordinates(task: Task, op: Op):
    """(rows, i, j, m, sign, residues) putting the task's pairs on the cyclic group Z_m so that the answer is at
    i + sign * j, residues[t] being the element at coordinate t; rows leaves out pairs with an operand off the
    cycle (x_div_y's a = 0, which has no logarithm). None for ops that are not cyclic."""
    if op.cycle is None:
        return None
    sign, order = op.cycle(task.n_classes)
    residues = torch.tensor(order)
    position = torch.full((task.n_classes,), -1, dtype=torch.long)
    position[residues] = torch.arange(len(residues))
    rows = torch.nonzero((position[task.a] >= 0) & (position[task.b] >= 0)).flatten()
    return rows, position[task.a[rows]], position[task.b[rows]], len(residues), sign, residues


# Power et al. 2022's other binary ops (openai/grok, grok/data.py), beside the four of experiment.py's OPS
POWER_OPS = (
    Op("x_times_y", "x * y mod p (y != 0, as Grokfast's)", modular(lambda a, b, p: a * b, b_from=1),
       multiplicative(1)),
    Op("x2_plus_y", "(x^2 + y) mod p", modular(lambda a, b, p: a * a + b)),
    Op("x3_plus_y", "(x^3 + y) mod p", modular(lambda a, b, p: a ** 3 + b)),
    Op("x2_plus_y2", "(x^2 + y^2) mod p", modular(lambda a, b, p: a * a + b * b)),
    Op("x2_xy_y2", "(x^2 + xy + y^2) mod p", modular(lambda a, b, p: a * a + a * b + b * b)),
    Op("x2_xy_y2_x", "(x^2 + xy + y^2 + x) mod p", modular(lambda a, b, p: a * a + a * b + b * b + a)),
    Op("x3_xy", "(x^3 + xy) mod p", modular(lambda a, b, p: a ** 3 + a * b)),
    Op("x3_xy2_y", "(x^3 + xy^2 + y) mod p", modular(lambda a, b, p: a ** 3 + a * b * b + b)),
    Op("x_floordiv_y_or_minus", "x // y if y is odd, else (x - y) mod p",
       modular(lambda a, b, p: torch.where(b % 2 == 1, a // b.clamp(min=1), a - b))),
    Op("permutation_conj", "a o b o a^-1 in S_k", permutation_group(lambda a, b: compose(compose(a, b), a.argsort(1)))),
    Op("permutation_aba", "a o b o a in S_k", permutation_group(lambda a, b: compose(compose(a, b), a))),
)
