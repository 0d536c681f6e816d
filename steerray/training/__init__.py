"""Shared training utilities for ``train-reward`` and ``train-sft`` (jobs repeat wiring, never this math).

Public API (import from the submodules; this package imports nothing heavy on its own):

``steerray.training.strategy``
    - ``plan_ray_scaling(scaling_cfg) -> RayScalingPlan``: driver side; ``.num_workers``, ``.use_gpu`` (from
      the cluster's GPUs, never hard-coded), ``.scaling_config`` (ray.train.ScalingConfig with fractional
      CPUs per worker), ``.torch_config`` (TorchConfig, nccl on GPU, gloo on CPU).
    - ``resolve_strategy(scaling_cfg) -> Strategy``: worker side (or a plain process, world size 1):
      ``.kind`` (fsdp | ddp | deepspeed | single), ``.device``, ``.precision`` (bf16 on GPU, fp32 on CPU),
      ``.world_size``, ``.rank``, ``.is_rank0``, ``.autocast()``, ``.all_reduce_sum([..])``,
      ``.all_gather_objects(obj)``, ``.barrier()``, ``.compute_dtype``.
    - ``prepare_model(model, strategy, lora_cfg, *, trainable_modules=(), gradient_checkpointing=False,
      wrap=None, attention="auto") -> PreparedModel``: the attention kernel (``training_attention``: eager on
      a CPU training in bf16 without AMX), peft LoRA (``trainable_modules`` such as the reward head ``score``
      stay fully trainable via ``modules_to_save``), then FSDP2 ``fully_shard`` per decoder layer + root / DDP.
      Call ``prepared.module(...)`` (the root); ``prepared.model`` is the HF/peft model inside;
      ``prepared.num_parameters(trainable_only=)``, ``prepared.flops_parameters()`` (for MFU: no embedding
      lookup, lm_head counted). ``lora.last_layers=N`` adapts only the top N layers (cheap backward).
      Big models: build the model on the meta device on ranks != 0 (``scaling.load_on_rank0``) and FSDP2
      broadcasts rank 0's weights into every shard after ``fully_shard``.
    - ``build_optimizer_and_schedule(prepared, optim_cfg, max_steps, accumulation_steps) -> Stepper``:
      AdamW + NeMo CosineAnnealing (DeepSpeed ZeRO engine when ``scaling.strategy=deepspeed``).
      ``with stepper.micro_step(last=...): stepper.backward(loss)``; ``stepper.step() -> StepResult``
      (clipped grad norm, lr used).
    - ``export_model(prepared, out_dir, tokenizer, *, merge_lora=None, dtype=None)``: collective; gathers the
      full state dict on every rank and writes a safetensors HF folder on rank 0 (LoRA merged, or a peft
      adapter carrying ``modules_to_save``). ``gather_full_state_dict``, ``build_plain_copy`` underneath.
``steerray.training.schedule``
    - ``nemo_cosine_lr(step, lr=, min_lr=, warmup_steps=, constant_steps=, max_steps=)``, ``lr_at(optim, max_steps,
      step)``, ``check_schedule(optim, max_steps)``, ``build_optimizer(module, optim)``,
      ``build_scheduler(optimizer, optim, max_steps)``.
``steerray.training.losses`` (each ``*_sum`` returns ``(sum, count)``; normalise with the global count)
    - ``masked_mse_sum`` / ``masked_mse`` (ignore -100, mean over valid cells),
      ``bradley_terry_sum`` / ``bradley_terry_loss`` (scaled_bt | regular_bt | margin_bt on explicit pairs),
      ``token_cross_entropy_sum`` / ``token_cross_entropy`` (from logits, HF shift, ignore -100),
      ``trained_token_nll(model, input_ids, attention_mask, labels)`` (SFT and SteerLM 2.0: the model's NLL
      of each trained token, the lm_head run on the trained positions only where transformers can),
      ``normalize_loss(loss_sum, global_count, world_size)``; ``IGNORE_INDEX``.
``steerray.training.batching``
    - ``accumulation_steps(global_batch, micro_batch, world_size)``, ``steps_per_epoch(rows, global_batch)``,
      ``plan_step(lengths, step, global_batch=, micro_batch=, world_size=, rank=, seed=, length_grouping=)
      -> StepPlan`` (deterministic, resumable, length-grouped), ``eval_micro_batches(lengths, micro_batch,
      world_size, rank)`` (equal batch counts per worker, fillers flagged), ``pad_batch(seqs, pad_id)``,
      ``padding_efficiency``.
``steerray.training.checkpoint``
    - ``CheckpointManager(prepared, stepper, every=N)``: ``.restore() -> Progress | None`` (from
      ``ray.train.get_checkpoint()``), ``.due(step, last)``, ``.save(step, metrics, extra)`` (DCP shards +
      scheduler + step + RNG through ``ray.train.report``), ``.report(metrics)``; disabled outside Ray Train.
    - ``check_fingerprint(storage_dir, fingerprint)``: a re-run resumes only the same model/data/loss.
``steerray.training.metrics``
    - ``MetricsWriter(path, enabled=rank0, resume_step=)``, ``read_metrics``, ``Throughput(num_params, peak,
      world_size, flops_per_token=None)``, ``measure_matmul_peak(device, dtype)``, ``train_flops_per_token``,
      ``train_flops_per_token_partial`` (LoRA), ``progress_bar``,
      ``WandbLogger`` (only with WANDB_API_KEY / WANDB_MODE; offline-safe).
``steerray.training.reward_data``
    - reward-specific: read/validate a ``prepare`` folder, tokenize with left truncation, collate.
``steerray.training.frozen_prefix``
    - ``FrozenPrefixCache(model, budget_mb)``: with ``lora.last_layers``, each row's hidden states below the
      first trained layer, computed once (``.hidden(keys, input_ids, attention_mask)``), checked once
      against the whole model (``.agrees``); train-reward's ``train.frozen_prefix_cache_mb``.
Reward-model quality metrics (MSE / Pearson / Spearman per attribute, pairwise accuracy) live in
``steerray.eval.metrics``.
"""
