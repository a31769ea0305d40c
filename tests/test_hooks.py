"""Hook points (TransformerLens's convention): identity modules named hook_* in every block, read and replaced by
name through forward_hooks, in one model and in a batch, and untouched numbers when nothing is attached."""
import torch

import experiment as E
from lab import batched
from lab.plugins import forward_hooks, hook_points

CFG = E.Config(p=11, d_model=32, n_heads=4)
TASK = E.task_of(CFG, "x_plus_y")


def model(seed=0):
    torch.manual_seed(seed)
    return E.build_model(CFG, TASK).eval()


def test_every_block_has_the_four_hook_points_and_each_sees_every_position():
    m, seen = model(), {}
    names = hook_points(m)

    def note(name, module, inputs, out):  # returns None: reads, replaces nothing
        seen[name] = out.shape

    assert names == [f"blocks.{i}.hook_{kind}" for i in range(2)
                     for kind in ("pattern", "attn_out", "mlp_post", "resid_post")]
    x = TASK.x[:7]
    with torch.no_grad(), forward_hooks(m, {n: note for n in names}):
        m(x)
    seq, heads = x.shape[1], CFG.n_heads
    for i in range(2):  # the last block too: with a hook attached, every position runs (the plain path)
        assert seen[f"blocks.{i}.hook_pattern"] == (7, seq, seq, heads)
        assert seen[f"blocks.{i}.hook_attn_out"] == (7, seq, CFG.d_model)
        assert seen[f"blocks.{i}.hook_mlp_post"] == (7, seq, 4 * CFG.d_model)
        assert seen[f"blocks.{i}.hook_resid_post"] == (7, seq, CFG.d_model)


def test_a_pattern_hook_reads_attention_that_sums_to_one_over_the_keys_and_is_causal():
    m, held = model(), {}
    with torch.no_grad(), forward_hooks(m, {"blocks.0.hook_pattern": lambda n, mod, i, out: held.update(w=out)}):
        # dict.update returns None: the hook reads
        m(TASK.x[:5])
    w = held["w"]  # (batch, q, k, heads)
    torch.testing.assert_close(w.sum(2), torch.ones_like(w.sum(2)))
    assert (w[:, 0, 1:] == 0).all() and (w[:, 2, 3:] == 0).all()


def test_nothing_attached_leaves_the_numbers_and_a_read_only_hook_moves_them_at_most_by_rounding():
    m, x = model(), TASK.x
    with torch.no_grad():
        plain = m(x)
        assert torch.equal(plain, m(x))
        with forward_hooks(m, {"blocks.1.hook_resid_post": lambda *args: None}):  # reads, replaces nothing
            read = m(x)
    torch.testing.assert_close(read, plain, rtol=1e-5, atol=1e-5)  # the plain path: other rounding, same numbers


def test_a_hook_that_replaces_an_activation_changes_the_output_in_one_model_and_in_a_batch():
    def uniform(name, module, inputs, out):  # attention spread evenly over the visible keys
        visible = (out > 0).float()
        return visible / visible.sum(2, keepdim=True)

    models = [model(0), model(1)]
    x = TASK.x[:9]
    with torch.no_grad():
        before = [m(x) for m in models]
        alone = []
        for m in models:
            with forward_hooks(m, {f"blocks.{i}.hook_pattern": uniform for i in range(2)}):
                alone.append(m(x))
        stack = batched.Stack(models)
        with forward_hooks(stack.base, {f"blocks.{i}.hook_pattern": uniform for i in range(2)}):
            together = stack(torch.stack([x, x]))
    for k in range(2):
        assert not torch.allclose(alone[k], before[k], atol=1e-3)
        torch.testing.assert_close(together[k], alone[k], rtol=1e-5, atol=1e-5)
