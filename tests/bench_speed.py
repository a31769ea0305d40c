"""Speed benchmark (not collected by pytest): python tests/bench_speed.py [--quick] [--bf16]

Prints, for this machine:
  1. the fp32 / bf16 GEMM peak (2048x128 @ 128x512), on 1 and 2 threads;
  2. the template's step time (its model, data pipeline and evaluation every 10 steps,
     re-implemented here as the reference path) and ours, their ratio, the FLOPs a step
     needs (counted analytically) and the fraction of the GEMM peak reached;
  3. throughput of 2 single-thread processes vs 1 two-thread process (the --workers default);
  4. the cost of one activation capture relative to a default (op, seed) run;
  5. with --bf16, the same step under bf16 autocast.
Every time is the median of several repeats. Add --gpu figures automatically when CUDA is present.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiment as E  # noqa: E402
from conftest import make_run  # noqa: E402
from bench_plot import cpu_description  # noqa: E402


def median_time(fn, repeats: int, inner: int) -> float:
    """Median over repeats of the mean time of `inner` calls, after one warm-up round."""
    for _ in range(max(1, inner // 4)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def gemm_peak(dtype, device="cpu") -> float:
    a = torch.randn(2048, 128, device=device, dtype=dtype)
    b = torch.randn(128, 512, device=device, dtype=dtype)

    def mm():
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * 2048 * 128 * 512 / median_time(mm, 7, 200)


# ----------------------------------------------------------------------------- the template, as reference
class TemplateDecoderBlock(nn.Module):
    def __init__(self, dim_model, n_heads):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim_model, n_heads)
        self.self_attn_norm = nn.LayerNorm(dim_model)
        self.ffn = nn.Sequential(nn.Linear(dim_model, dim_model * 4), nn.GELU(), nn.Linear(dim_model * 4, dim_model))
        self.ffn_norm = nn.LayerNorm(dim_model)

    def forward(self, x):
        attn_mask = torch.full((len(x), len(x)), -float("Inf"), device=x.device, dtype=x.dtype).triu(1)
        a1, _ = self.self_attn(x, x, x, attn_mask=attn_mask)
        a1 = self.self_attn_norm(x + a1)
        return self.ffn_norm(a1 + self.ffn(a1))


class TemplateTransformer(nn.Module):
    def __init__(self, num_layers, dim_model, num_heads, vocab_size, output_size, seq_len):
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, dim_model)
        self.position_embeddings = nn.Embedding(seq_len, dim_model)
        self.model = nn.Sequential(*[TemplateDecoderBlock(dim_model, num_heads) for _ in range(num_layers)],
                                   nn.LayerNorm(dim_model), nn.Linear(dim_model, output_size))

    def forward(self, inputs):
        batch_size, context_len = inputs.shape
        token_embedding = self.token_embeddings(inputs)
        positions = torch.arange(context_len, device=inputs.device).unsqueeze(0).expand(batch_size, -1)
        embedding = token_embedding + self.position_embeddings(positions)
        return self.model(embedding.transpose(0, 1))  # (seq, batch, classes)


class TemplateStream(torch.utils.data.IterableDataset):
    """The template's GroupDataset: one Python-built example at a time, drawn with replacement."""

    def __init__(self, task, rows):
        self.task, self.rows = task, rows.tolist()

    def __iter__(self):
        return self

    def __next__(self):
        row = random.choice(self.rows)
        return torch.tensor(self.task.x[row].tolist()), torch.tensor(int(self.task.y[row]))


def template_round(model, optimizer, scheduler, train_iter, val_iter, device):
    """The template's train() (10 batches) then evaluate() (8 batches of 512), each ending in float() as its
    metrics do (on a GPU, the one synchronisation a round has)."""
    model.train()
    correct = 0
    for _ in range(10):
        inputs, labels = (t.to(device) for t in next(train_iter))
        optimizer.zero_grad()
        output = model(inputs)[-1, :, :]
        loss = F.cross_entropy(output, labels)
        correct += (torch.argmax(output, dim=1) == labels).sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
    float(correct)
    model.eval()
    correct = 0
    for _ in range(8):
        inputs, labels = (t.to(device) for t in next(val_iter))
        with torch.no_grad():
            output = model(inputs)[-1, :, :]
            correct += (torch.argmax(output, dim=1) == labels).sum()
            F.cross_entropy(output, labels)
    float(correct)


def template_step_time(task, train_idx, val_idx, repeats, rounds, device="cpu") -> float:
    random.seed(0)
    torch.manual_seed(1337)
    model = TemplateTransformer(2, 128, 4, task.n_vocab, task.n_classes, 5).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(s / 50, 1))
    train_iter = iter(torch.utils.data.DataLoader(TemplateStream(task, train_idx), batch_size=512))
    val_iter = iter(torch.utils.data.DataLoader(TemplateStream(task, val_idx), batch_size=512))
    return median_time(lambda: template_round(model, optimizer, scheduler, train_iter, val_iter, device), repeats,
                       rounds) / 10


# ----------------------------------------------------------------------------- ours
def our_step_time(task, train_idx, val_idx, repeats, rounds, dtype="fp32", device="cpu") -> float:
    """Seconds per update of experiment.train_one's hot loop: 10 updates, then one full validation pass."""
    cfg = E.Config(dtype=dtype)
    device = torch.device(device)
    torch.manual_seed(1337)
    model = E.build_model(cfg, task).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.5, fused=True)
    x_train, y_train = task.x[train_idx].to(device), task.y[train_idx].to(device)
    x_val, y_val = task.x[val_idx].to(device), task.y[val_idx].to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    from contextlib import nullcontext

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    loss_sum = torch.zeros((), device=device)

    def round_():
        for _ in range(10):
            batch = torch.randint(len(y_train), (512,), device=device, generator=gen)
            with autocast():
                logits = model(x_train[batch])
            loss = F.cross_entropy(logits.float(), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum.add_(loss.detach())
        E.evaluate(model, x_val, y_val, autocast, E.LOSSES["cross_entropy"])

    return median_time(round_, repeats, rounds) / 10


def step_flops(task, n_train_batch=512, n_val=None, d=128, eval_every=10) -> dict:
    """Matrix-multiply FLOPs of one update plus 1/eval_every of an evaluation, counted analytically."""
    n_vocab, n_classes = task.n_vocab, task.n_classes
    heads_attn = 2 * 4 * d  # per (query, key) pair: scores and weighted sum, all heads: 2 * d MACs

    def forward_macs(batch, shared=True):
        if not shared:  # every position through both blocks except the last block's tail
            block1 = batch * 4 * 12 * d * d + batch * 4 * 4 * heads_attn / 2
            block2 = batch * (4 * 2 * d * d + 10 * d * d) + batch * 4 * heads_attn / 2
            return block1 + block2 + batch * d * n_classes
        prefix = n_vocab * 2 * 12 * d * d + n_vocab * 2 * 3 * d * d  # block 1 full, block 2 q/k/v only
        table = n_vocab * 2 * 3 * d * d  # vocab_table: block 1's q/k/v at b and "=", once per vocabulary entry
        block1 = table + batch * 2 * 9 * d * d + batch * 2 * 4 * heads_attn / 2
        block2 = batch * (2 * 2 * d * d + 10 * d * d) + batch * 4 * heads_attn / 2
        return prefix + block1 + block2 + batch * d * n_classes

    n_val = n_val if n_val is not None else len(task.y) // 2
    needed = 2 * (3 * forward_macs(n_train_batch) + forward_macs(n_val) / eval_every)
    plain = 2 * (3 * forward_macs(n_train_batch, False) + forward_macs(n_val, False) / eval_every)
    return {"needed": needed, "plain": plain, "train_only": 2 * 3 * forward_macs(n_train_batch)}


def two_process_throughput(rounds, dtype="fp32") -> float:
    """Updates per second of two concurrent single-thread processes (the --workers default on 2 cores)."""
    code = ("import sys; sys.path.insert(0, %r); sys.path.insert(0, %r); import torch; torch.set_num_threads(1);"
            "import bench_speed as B, experiment as E; t = E.make_task('x_plus_y'); tr, va = E.split_pairs(len(t.y), 0.5, 0);"
            "print(B.our_step_time(t, tr, va, 3, %d, dtype=%r))"
            % (ROOT, os.path.dirname(os.path.abspath(__file__)), rounds, dtype))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    times = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return sum(1 / t for t in times)


def capture_cost(task, train_idx, val_idx, repeats=5) -> float:
    """Seconds for one snapshot: the forward over every pair with hooks, and the safetensors file."""
    import tempfile

    from safetensors.torch import save_file

    cfg = E.Config()
    model = E.build_model(cfg, task)
    names = list(model.capture_modules.values())
    with tempfile.TemporaryDirectory() as folder:
        def once():
            run = make_run(cfg, "x_plus_y", task, train_idx, val_idx, model, out_dir=folder)
            outputs = run.all_outputs()  # without an evaluation to share: both halves of the pairs
            save_file({k: outputs[k].half().contiguous() for k in names}, os.path.join(folder, "s.safetensors"))

        return median_time(once, repeats, 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    parser.add_argument("--gpu_only", action="store_true", help="only the GPU figures (the template's step and ours)")
    args = parser.parse_args()
    repeats, rounds = (3, 5) if args.quick else (5, 20)
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads by default; "
          f"times are medians of {repeats} repeats")
    task = E.make_task("x_plus_y")
    train_idx, val_idx = E.split_pairs(len(task.y), 0.5, 0)
    if args.gpu_only:
        return gpu_figures(task, train_idx, val_idx, repeats, rounds)

    torch.set_num_threads(1)
    peak1 = gemm_peak(torch.float32)
    torch.set_num_threads(min(2, cores))
    peak2, peak2_bf16 = gemm_peak(torch.float32), gemm_peak(torch.bfloat16)
    print(f"GEMM 2048x128 @ 128x512: fp32 {peak1 / 1e9:.0f} GFLOP/s on 1 thread, {peak2 / 1e9:.0f} on 2; "
          f"bf16 {peak2_bf16 / 1e9:.0f} on 2")

    flops = step_flops(task)
    template = template_step_time(task, train_idx, val_idx, repeats, rounds)
    ours2 = our_step_time(task, train_idx, val_idx, repeats, rounds)
    torch.set_num_threads(1)
    ours1 = our_step_time(task, train_idx, val_idx, repeats, rounds)
    torch.set_num_threads(min(2, cores))
    print(f"FLOPs per update (with 1/10 of an evaluation): {flops['needed'] / 1e9:.2f} GFLOP as computed here "
          f"(shared prefix, last block at the answer only); {flops['plain'] / 1e9:.2f} GFLOP for all positions")
    print(f"template (reference path), 2 threads: {template * 1e3:.1f} ms per update")
    print(f"ours, 1 process x 2 threads:          {ours2 * 1e3:.1f} ms per update = {template / ours2:.2f}x the "
          f"template; {flops['needed'] / ours2 / 1e9:.0f} GFLOP/s = {flops['needed'] / ours2 / peak2:.0%} of the "
          f"2-thread fp32 peak")
    print(f"ours, 1 process x 1 thread:           {ours1 * 1e3:.1f} ms per update; "
          f"{flops['needed'] / ours1 / 1e9:.0f} GFLOP/s = {flops['needed'] / ours1 / peak1:.0%} of the 1-thread peak")
    if cores >= 2:
        throughput = two_process_throughput(rounds)
        print(f"ours, 2 processes x 1 thread (the default --workers): {throughput:.1f} updates/s in all = "
              f"{1e3 / throughput:.1f} ms per update = {template * throughput:.2f}x the template's throughput; "
              f"{flops['needed'] * throughput / peak2:.0%} of the 2-thread fp32 peak; "
              f"{throughput * ours2:.2f}x one 2-thread process")
    snapshot = capture_cost(task, train_idx, val_idx)
    per_run = 13 * snapshot / (7500 * ours1)
    print(f"one activation snapshot (x_plus_y, every pair, both blocks, written): {snapshot * 1e3:.0f} ms; "
          f"13 snapshots (the most a default run takes) = {per_run:.2%} of a 7500-step single-thread pair")
    if args.bf16:
        bf16 = our_step_time(task, train_idx, val_idx, repeats, rounds, dtype="bf16")
        print(f"ours, bf16 autocast, 1 process x 2 threads: {bf16 * 1e3:.1f} ms per update = "
              f"{template / bf16:.2f}x the template")
        if cores >= 2:
            throughput = two_process_throughput(rounds, "bf16")
            print(f"ours, bf16 autocast, 2 processes x 1 thread: {1e3 / throughput:.1f} ms per update = "
                  f"{template * throughput:.2f}x the template's throughput")
    if torch.cuda.is_available():
        gpu_figures(task, train_idx, val_idx, repeats, rounds)


def gpu_figures(task, train_idx, val_idx, repeats, rounds):
    """The template's step (its model, its DataLoader moved to the GPU batch by batch) and ours, on the GPU."""
    if not torch.cuda.is_available():
        raise SystemExit("bench_speed: --gpu_only but no CUDA device is available")
    template = template_step_time(task, train_idx, val_idx, repeats, rounds, device="cuda")
    ours = our_step_time(task, train_idx, val_idx, repeats, rounds, device="cuda")
    bf16 = our_step_time(task, train_idx, val_idx, repeats, rounds, dtype="bf16", device="cuda")
    print(f"GPU {torch.cuda.get_device_name()}, fp32 GEMM 2048x128 @ 128x512: "
          f"{gemm_peak(torch.float32, 'cuda') / 1e12:.1f} TFLOP/s")
    print(f"  template's step on the GPU: {template * 1e3:.2f} ms per update")
    print(f"  ours on the GPU:            {ours * 1e3:.2f} ms per update = {template / ours:.2f}x the template")
    print(f"  ours, bf16 autocast:        {bf16 * 1e3:.2f} ms per update = {template / bf16:.2f}x the template")


if __name__ == "__main__":
    main()
