"""FSDP2 on two CPU processes (gloo, no Ray): rank-0-only loading fills every shard, the export gathers the
full model, and the gradients of a global batch split over two workers equal one process's on the whole batch.

Two plain Python processes are started with torch.distributed's env:// rendezvous; Ray Train does the same
set-up for its workers, so this exercises the strategy code without paying for a TorchTrainer.fit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from steerray.config import OptimConfig, ScalingConfig
    from steerray.models.loading import load_tokenizer
    from steerray.models.reward import build_reward_model, encode_reward_texts, reward_readout
    from steerray.training.losses import masked_mse_sum, normalize_loss
    from steerray.training.strategy import build_optimizer_and_schedule, export_model, prepare_model, resolve_strategy

    model_dir, out, texts, labels = sys.argv[1], sys.argv[2], eval(sys.argv[3]), eval(sys.argv[4])
    dist.init_process_group("gloo")
    strategy = resolve_strategy(ScalingConfig(precision="fp32"))
    assert strategy.kind == "fsdp" and strategy.world_size == 2, strategy
    torch.manual_seed(0)
    # load_on_rank0: rank 1 builds an empty (meta) model and receives its shards from rank 0
    model = build_reward_model(model_dir, empty=strategy.rank != 0)
    prepared = prepare_model(model, strategy, None, trainable_modules=["score"], wrap=reward_readout)
    stepper = build_optimizer_and_schedule(prepared, OptimConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0), 5)
    tokenizer = load_tokenizer(model_dir)
    export_model(prepared, out, tokenizer)  # before any step: must equal rank 0's weights exactly
    mine = slice(strategy.rank * 2, strategy.rank * 2 + 2)  # this worker's half of the global batch
    batch = encode_reward_texts(tokenizer, texts[mine], 64)
    target = torch.tensor(labels[mine])
    count = strategy.all_reduce_sum([int((target != -100).sum())])[0]
    with stepper.micro_step(last=True):
        part, _ = masked_mse_sum(prepared.module(batch.input_ids, batch.attention_mask), target)
        stepper.backward(normalize_loss(part, count, strategy.world_size))
    grads = {n: p.grad.full_tensor() for n, p in prepared.model.named_parameters()}  # synced over workers
    if strategy.rank == 0:
        torch.save(grads, out + "/grads.pt")
    dist.destroy_process_group()
''')

TEXTS = ["<extra_id_1>Assistant\nshort\n<extra_id_2>", "<extra_id_1>Assistant\na longer answer here\n<extra_id_2>",
         "<extra_id_1>Assistant\nmedium answer\n<extra_id_2>", "<extra_id_1>Assistant\nyes\n<extra_id_2>"]
LABELS = [[-100.0] * 4 + [1.0, 2.0, 3.0, 0.0, 0.0], [2.0] * 9, [-100.0] * 8 + [4.0], [1.0, 0.0, 0.0, 1.0] + [-100.0] * 5]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp2_two_processes_match_one(tmp_path: Path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from steerray.config import ScalingConfig
    from steerray.models.loading import load_tokenizer
    from steerray.models.reward import build_reward_model, encode_reward_texts, reward_readout
    from steerray.training.losses import masked_mse_sum, normalize_loss
    from steerray.training.strategy import prepare_model, resolve_strategy

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), tiny_model_dir, str(tmp_path / "model"), repr(TEXTS),
                               repr(LABELS)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    # Rank 1 started empty and got rank 0's weights: the export equals the model rank 0 built.
    torch.manual_seed(0)
    reference = build_reward_model(tiny_model_dir)
    got = load_file(tmp_path / "model" / "model.safetensors")
    expected = reference.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], value) for name, value in expected.items())

    # One backward on the whole global batch in one process gives the gradients the two workers agreed on.
    prepared = prepare_model(reference, resolve_strategy(ScalingConfig(precision="fp32")), None, trainable_modules=["score"],
                             wrap=reward_readout)
    batch = encode_reward_texts(load_tokenizer(tiny_model_dir), TEXTS, 64)
    part, count = masked_mse_sum(prepared.module(batch.input_ids, batch.attention_mask), torch.tensor(LABELS))
    normalize_loss(part, int(count)).backward()
    grads = torch.load(tmp_path / "model" / "grads.pt")
    for name, param in prepared.model.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-6, rtol=1e-4), name
    assert float(grads["score.weight"].abs().sum()) > 0
