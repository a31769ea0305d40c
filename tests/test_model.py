import pytest
import torch
import torch.nn.functional as F

import experiment as E
from conftest import make_run
from lab.plugins import count_forward_hooks, forward_hooks


@pytest.mark.parametrize("op", ["x_plus_y", "permutation"])
def test_shared_prefix_matches_plain_forward_and_gradients(op):
    task = E.make_task(op, p=11, perm_k=4)
    torch.manual_seed(0)
    model = E.Transformer(task.n_vocab, task.n_classes, d_model=32)
    x, y = task.x[:200], task.y[:200]
    grads = []
    for shared in (True, False):
        model.shared_prefix = shared
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.shared_prefix = True
    fast = model(x)
    model.shared_prefix = False
    assert torch.allclose(fast, model(x), atol=1e-5)
    for g_fast, g_plain in zip(*grads):
        assert torch.allclose(g_fast, g_plain, atol=1e-5)


def test_block_is_causal():
    """Changing a later token never changes an earlier position's output."""
    torch.manual_seed(0)
    block = E.Block(32, 4)
    x = torch.randn(5, 4, 32)
    y = x.clone()
    y[:, 3] += 1.0
    out_x, out_y = block(x), block(y)
    assert torch.allclose(out_x[:, :3], out_y[:, :3])
    assert not torch.allclose(out_x[:, 3], out_y[:, 3])


def test_forward_hooks_are_removed_even_when_forward_raises():
    task = E.make_task("x_plus_y", p=7)
    model = E.Transformer(task.n_vocab, task.n_classes, d_model=16)
    seen = []
    with forward_hooks(model, {"blocks.0": lambda *a: seen.append(a[0]), "blocks.1": lambda *a: seen.append(a[0])}):
        assert count_forward_hooks(model) == 2
        model(task.x)
    assert seen == ["blocks.0", "blocks.1"] and count_forward_hooks(model) == 0

    def boom(*args):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError):
        with forward_hooks(model, {"blocks.1": boom}):
            model(task.x)
    assert count_forward_hooks(model) == 0
    with pytest.raises(AttributeError):
        with forward_hooks(model, {"blocks.0": boom, "no.such.module": boom}):
            pass
    assert count_forward_hooks(model) == 0


@pytest.mark.parametrize("model_name", ["transformer", "gpt2"])
def test_capture_returns_answer_position_of_each_block_and_leaves_no_hook(model_name):
    task = E.make_task("x_plus_y", p=7)
    cfg = E.Config(model=model_name, d_model=32)
    model = E.build_model(cfg, task)
    model.train()
    names = list(model.capture_modules.values())
    train_idx, val_idx = E.split_pairs(len(task.y), 0.5, 0)
    run = make_run(cfg, "x_plus_y", task, train_idx, val_idx, model)
    outputs = run.all_outputs()
    assert run.all_outputs() is outputs  # once per step
    acts, logits = {name: outputs[name] for name in names}, outputs["logits"]
    assert logits.shape == (len(task.y), task.n_classes)
    assert set(acts) == set(names)
    for t in acts.values():
        assert t.shape == (len(task.y), 32) and not t.requires_grad
    assert count_forward_hooks(model) == 0 and model.training
    # The last block's output at the answer position is what the head reads.
    with torch.no_grad():
        last = acts[model.capture_modules["last"]]
        if model_name == "transformer":
            assert torch.allclose(model.head(model.norm(last)), model(task.x), atol=1e-5)
        else:
            assert torch.allclose(model.head(model.gpt2.ln_f(last)), model(task.x), atol=1e-5)
