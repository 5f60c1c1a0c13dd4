"""Tests for the training script, its model and data, bench.py and the documentation.

Run with the optimizer tests: ``python -m pytest -q -n auto --dist loadgroup``.
Sections, in order:

1. The model (llama_c4.Llama): shapes, causality, RMSNorm, rotary embedding.
2. The data: C4 shards, packing, shuffling, splits, resuming a stream, bad data.
3. The script end to end (train_tiny_llama.main): training, resuming, Ctrl-C,
   checkpoints, flags and their errors, --help.
4. Requirements and distributed runs (torchrun on CPU: DDP, ZeRO-1, FSDP2, layer-wise).
5. bench.py: every subcommand on tiny settings.
6. The documentation: every command README.md and docs/RESULTS.md show, run in order
   in a scratch folder; their links resolve.

Tests that start a process say so in their name or docstring; the rest call
``main()`` directly. The optimizers themselves are tested in
test_lowrank_adam.py.
"""

# What the README promises, and the test that checks it: one promise an entry, paraphrased -> its tests.
# The optimizers' own promises (their math, the API, param groups, "Where it runs" but for the script,
# copying one class out) are test_lowrank_adam.py's. Every test named here is one of this file's
# (test_the_promise_map_names_tests_of_this_file).
#
# The picture and its caption
#   drawn by its `bench.py plot --results` command -> test_every_docs_command_runs,
#       test_plot_results_draws_loss_against_state_and_refuses_a_malformed_file
#   its numbers are RESULTS.md's table of every optimizer ->
#       test_the_results_file_of_the_picture_holds_the_rows_of_its_results_table
#   bars: the seeds' spread; dashed: the Pareto front; dotted: Muon's loss ->
#       test_plot_results_draws_loss_against_state_and_refuses_a_malformed_file,
#       test_plot_results_as_svg_needs_no_matplotlib_and_marks_each_row_the_front_and_muon,
#       test_pareto_front_is_every_point_no_other_beats_ties_and_duplicates_included,
#       test_svg_draws_a_muon_line_and_band_for_each_row_whose_label_starts_with_muon
#   drawn as SVG by Python alone (no matplotlib), the file the README shows being today's drawing ->
#       test_plot_results_as_svg_needs_no_matplotlib_and_marks_each_row_the_front_and_muon,
#       test_the_results_file_of_the_picture_holds_the_rows_of_its_results_table, test_every_docs_command_runs
#   the tiny LLaMA: 0.24M parameters, byte tokens, 300 steps ->
#       test_the_default_run_trains_the_tiny_llama_on_bytes_with_adamw_into_out,
#       test_the_published_shapes_have_the_sizes_they_are_named_after
# Install
#   torch 2.5 or newer, a torch in that range kept; tested with 2.13.0 ->
#       test_requirements_state_a_torch_range_and_ci_installs_the_tested_version
#   requirements.txt brings numpy, tokenizers, tqdm; pytest, hypothesis, transformers ->
#       test_the_readme_names_what_requirements_txt_installs_and_ci_runs_its_test_command,
#       test_requirements_list_numpy_so_torch_imports_without_a_warning
#   -c constraints.txt: the exact torch and transformers of the tests ->
#       test_the_readme_names_what_requirements_txt_installs_and_ci_runs_its_test_command,
#       test_requirements_state_a_torch_range_and_ci_installs_the_tested_version
#   the CPU-only wheel's pip command -> no test: a download (the suite runs no pip command)
# Quick start
#   `python train_tiny_llama.py` trains AdamW on the tiny LLaMA into out/ ->
#       test_the_default_run_trains_the_tiny_llama_on_bytes_with_adamw_into_out, test_every_docs_command_runs
#   ...on a corpus built from Python's own documentation, no download ->
#       test_the_embedded_corpus_is_pythons_own_documentation_of_the_size_the_readme_gives (its fixture refuses the
#       network), test_embedded_corpus_is_c4_format
#   ...under a minute on a 2-core CPU, as RESULTS.md's default run measured ->
#       test_the_quick_start_time_is_the_measured_default_run
#   `python -m pytest -q -n auto --dist loadgroup` runs the test suite (as CI runs it) ->
#       test_the_readme_names_what_requirements_txt_installs_and_ci_runs_its_test_command
# The optimizers, API, Where it runs: the lines about the script and the docs
#   the script's --stagger, or the spec galore+stagger / adaptive+stagger ->
#       test_stagger_reaches_the_optimizer_of_a_run_and_is_refused_where_no_class_takes_it
#   the API snippet runs on the GPT-2 its comment names, printing "0 {}" ->
#       test_docs_python_snippets_run_on_the_models_they_name
#   DESIGN.md's layer-wise snippet updates every parameter inside backward ->
#       test_docs_python_snippets_run_on_the_models_they_name
#   DESIGN.md: this file's torchrun tests check the distributed runs, 2 processes ->
#       test_torchrun_two_process_cpu_smoke, test_torchrun_zero_*, test_torchrun_fsdp_*
# The training script
#   every setting a flag, reaching the optimizer by name -> test_every_optimizer_flag_names_an_argument_of_an_optimizer,
#       test_flags_reach_the_optimizer, test_bad_flags_fail_before_anything_is_read_with_one_line
#   the optimizers by name: each trains and resumes -> test_script_trains_and_resumes_exactly,
#       test_a_new_optimizer_is_one_recipe
#   warmup + cosine -> test_lr_schedule, test_a_run_steps_with_the_warmup_and_cosine_schedule
#   gradient accumulation -> test_grad_accum_steps_once_on_the_mean_gradient_of_its_micro_batches
#   gradient clipping -> test_grad_clip_scales_the_gradients_down_to_the_global_norm_given
#   bf16 autocast on CUDA (none on the CPU) -> test_autocast_is_bf16_on_cuda_or_the_dtype_given (needs a GPU),
#       test_autocast_is_off_on_the_cpu
#   --compile -> test_compile_trains_through_torch_compile_and_resumes_exactly_without_it
#   --layerwise: updates inside backward, equal to the ordinary loop ->
#       test_layerwise_updates_each_parameter_inside_backward_and_frees_its_gradient,
#       test_layerwise_run_equals_the_ordinary_loop_and_resumes_exactly,
#       test_layerwise_and_zero_refuse_what_they_cannot_do
#   evaluation -> test_output_is_plain_lines_and_quiet_keeps_evaluations
#   checkpoints that --resume continues exactly; --stop-after N, continue later ->
#       test_script_trains_and_resumes_exactly, test_a_bpe_run_resumes_exactly,
#       test_a_late_resume_reads_at_most_one_shard_and_continues_exactly
#   DDP; --zero: each process keeps the optimizer state of its shard only -> test_torchrun_two_process_cpu_smoke,
#       test_torchrun_zero_galore_equals_plain_ddp_and_each_rank_keeps_its_shard_of_the_state,
#       test_torchrun_zero_adapprox_replicas_stay_identical_and_resume_exactly
#   --fsdp: weights, gradients and state sharded; one ckpt.pt; exact resume ->
#       test_torchrun_fsdp_galore_equals_plain_ddp_and_reports_each_ranks_state,
#       test_torchrun_fsdp_interrupted_and_resumed_equals_the_uninterrupted_run, test_fsdp_refuses_what_it_cannot_do
#   --fsdp --resume on another --nproc_per_node ->
#       test_torchrun_fsdp_resumes_on_another_number_of_processes_and_says_so,
#       test_only_an_fsdp_run_may_resume_on_another_number_of_processes
#   on GPUs: one process per GPU, NCCL instead of gloo ->
#       test_under_torchrun_each_process_takes_a_gpu_with_nccl_or_a_cpu_share_with_gloo
#   llama_c4.py: LLaMA in the published shapes 9m to 1b, plus tiny ->
#       test_the_published_shapes_have_the_sizes_they_are_named_after, test_llama_shapes_names_and_causality
#   ...and a streaming C4 loader whose position is saved ->
#       test_a_late_resume_reads_at_most_one_shard_and_continues_exactly,
#       test_reading_resumes_after_the_last_text_yielded,
#       test_prefetch_gives_the_same_batches_and_the_state_of_the_last_taken
#   --help lists every flag with its default -> test_help_lists_every_flag_with_the_default_a_run_uses,
#       test_help_is_grouped_with_examples_on_their_lines_and_one_default_per_flag, test_help_wraps_between_words_only
#   on a terminal a progress bar (loss, tokens/s, ETA) ->
#       test_progress_on_a_terminal_is_a_bar_with_eta_and_evaluations_stay_lines,
#       test_a_second_ctrl_c_on_a_terminal_ends_the_bar_before_its_message
#   piped, plain lines -> test_progress_piped_is_the_plain_lines_without_carriage_returns,
#       test_output_is_plain_lines_and_quiet_keeps_evaluations
#   the spec NAME[:KIND][+SWITCH]: adaptive:gap+residual = --rank-metric gap --residual ->
#       test_the_readme_spec_builds_the_optimizer_its_flags_build, test_flags_reach_the_optimizer
#   every command of its block runs (real C4 and T5's tokenizer.json: the embedded corpus and a BPE here) ->
#       test_every_docs_command_runs, test_train_and_validation_are_disjoint, test_a_bpe_run_resumes_exactly
#   without --data: Python's text (about 2.3 MB) as C4-format shards in ~/.cache/lowrank_adam, once ->
#       test_the_default_run_trains_the_tiny_llama_on_bytes_with_adamw_into_out,
#       test_the_embedded_corpus_is_pythons_own_documentation_of_the_size_the_readme_gives,
#       test_embedded_corpus_is_c4_format, test_the_first_run_says_it_writes_the_corpus_and_where_once,
#       test_an_interrupted_corpus_write_leaves_no_partial_corpus
#   the default tokenizer is UTF-8 bytes: perplexities per byte ->
#       test_the_default_run_trains_the_tiny_llama_on_bytes_with_adamw_into_out
#   a run lives in its --out-dir (ckpt.pt, metrics.jsonl), never overwritten ->
#       test_an_existing_run_is_never_overwritten, test_resume_without_a_checkpoint_is_refused_and_touches_nothing,
#       test_a_run_that_fails_before_its_first_step_leaves_nothing_behind
#   a diverging run stops with one line, saving nothing, its files renamed *.diverged.*, so that the same command with a
#       lower --lr starts there anew ->
#       test_a_diverging_run_stops_at_once_and_the_same_command_with_a_lower_lr_starts_anew,
#       test_a_run_diverging_after_a_checkpoint_sets_the_checkpoint_aside_too
#   Ctrl-C (or --stop-after N) saves a checkpoint and prints the command that continues ->
#       test_first_ctrl_c_saves_a_checkpoint_and_resume_continues, test_script_trains_and_resumes_exactly,
#       test_the_ctrl_c_handler_stops_once_and_is_restored, test_a_second_ctrl_c_says_what_was_kept
#   a resume takes the run's settings from its checkpoint ->
#       test_resume_needs_only_the_out_dir_and_refuses_only_explicit_changes
#   ...and refuses another value for any flag but the bookkeeping ones it lists ->
#       test_a_resume_may_change_the_bookkeeping_flags_the_readme_lists_and_no_other,
#       test_a_resume_with_other_settings_is_refused_naming_them
# bench.py
#   compare: every spec at every lr factor and seed, from the same initial weights and data order ->
#       test_compare_starts_every_spec_and_lr_of_a_seed_from_the_same_weights_and_data_order,
#       test_compare_tabulates_and_a_resumed_compare_reports_finished_runs,
#       test_compare_lr_sweep_names_runs_and_keeps_each_best_lr
#   --widen N extends a sweep past its edge while the best lr sits there ->
#       test_compare_widen_moves_past_an_edge_best_lr_until_the_best_is_inside,
#       test_compare_widen_steps_by_the_sweeps_geometric_ratio_and_counts_each_spec_on_its_own,
#       test_compare_widen_ranks_lrs_by_the_median_over_seeds_a_diverged_run_an_infinite_loss
#   times step() -> test_bench_steps_and_memory_tables,
#       test_bench_steps_full_gap_times_every_step_of_one_gap_with_and_without_stagger
#   measures memory -> test_bench_steps_and_memory_tables, test_memory_formula_equals_state_bytes_of_a_real_step,
#       test_bench_peak_measures_each_optimizer_in_a_fresh_process,
#       test_bench_shard_tabulates_each_ranks_state_and_peak_under_ddp_and_fsdp
#   plots; plot needs matplotlib -> test_plots_or_a_clear_message, test_plot_without_matplotlib_fails_before_training
#   plot --results draws the picture from compare's results.json or a table of results ->
#       test_plot_results_draws_loss_against_state_and_refuses_a_malformed_file
#   ...as a PNG, or with an --out ending in .svg without matplotlib ->
#       test_plot_results_as_svg_needs_no_matplotlib_and_marks_each_row_the_front_and_muon
#   each subcommand prints a markdown table -> test_compare_of_a_single_run_prints_its_table,
#       test_bench_steps_and_memory_tables, test_bench_refresh_and_steps_over_all_params,
#       test_bench_peak_measures_each_optimizer_in_a_fresh_process
#   `python bench.py --help` explains them -> test_bench_help_explains_every_subcommand
#   the commands shown run -> test_every_docs_command_runs
# Results, Tests, Licence
#   every measurement is in RESULTS.md with its command; the links resolve -> test_every_docs_command_runs,
#       test_readme_commands_are_shown_in_full, test_docs_links_resolve_and_stay_inside_the_repository
#   the suite runs in one process per core, at most 4, each on one CPU thread (conftest.py) ->
#       test_small_models_on_cpu_default_to_one_thread, test_the_suite_runs_on_at_most_four_processes
#   tests that share a fixture which starts processes run in one of them ->
#       test_tests_sharing_a_fixture_that_starts_processes_run_in_one_process_and_slow_tests_first
#   this file runs every command of the README and RESULTS.md, shrunk to a few tiny steps ->
#       test_every_docs_command_runs, test_readme_commands_are_shown_in_full
#   (and a test the docs name by name exists) -> test_the_tests_the_docs_name_exist
#   MIT; see LICENSE -> test_docs_links_resolve_and_stay_inside_the_repository

import builtins
import gzip
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import bench
import llama_c4
import lowrank_adam as la
import train_tiny_llama as tl

torch.set_num_threads(min(torch.get_num_threads(), 2))

NEEDS_MUON = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch's Muon needs torch >= 2.9")
ROOT = os.path.dirname(os.path.abspath(__file__))


def tiny_config(**over):
    return llama_c4.LlamaConfig(**{**dict(vocab_size=64, hidden=32, intermediate=48, heads=4, layers=2, max_seq_len=32),
                             **over})


def test_llama_shapes_names_and_causality():
    torch.manual_seed(0)
    model = llama_c4.Llama(tiny_config())
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 64) and loss.ndim == 0 and math.isfinite(loss.item())
    # changing a future token never changes earlier logits
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 64
    logits2, _ = model(idx2)
    torch.testing.assert_close(logits2[:, :10], logits[:, :10])
    assert not torch.allclose(logits2[:, 10:], logits[:, 10:])
    # lowrank_groups finds exactly the 7 attention/MLP matrices per layer
    groups = la.lowrank_groups(model, 4)
    assert len(groups[1]["params"]) == 7 * 2
    assert model.lm_head.weight is not model.embed_tokens.weight


def test_rmsnorm_scales_by_the_root_mean_square_with_eps_and_weight():
    x, norm = torch.randn(3, 8), llama_c4.RMSNorm(8, eps=1.0)
    norm.weight.data.fill_(2.0)
    torch.testing.assert_close(norm(x), 2 * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1.0))
    assert torch.equal(llama_c4.RMSNorm(8, 1e-6)(torch.zeros(2, 8)), torch.zeros(2, 8))  # eps: no 0/0


def test_rotary_rotates_each_pair_of_halves_as_a_complex_number():
    x, angles = torch.randn(1, 2, 5, 8), torch.rand(5, 4) * 6  # (B, nh, T, hs), (T, hs/2)
    z = torch.complex(*x.chunk(2, dim=-1)) * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(llama_c4.apply_rotary(x, angles.cos(), angles.sin()), torch.cat([z.real, z.imag], -1))


def test_logits_come_through_the_final_norm():
    torch.manual_seed(0)
    model, idx = llama_c4.Llama(tiny_config()), torch.randint(0, 64, (2, 8))
    logits, _ = model(idx)
    model.norm.weight.data.mul_(2)  # the head is linear in the final norm's output
    torch.testing.assert_close(model(idx)[0], 2 * logits)


def test_the_published_shapes_have_the_sizes_they_are_named_after():
    """--model 9m to 1b, the shapes of the GaLore and LDAdam experiments: with T5's vocabulary (32,100 tokens) each
    counts about the parameters its name says, as the papers name them (60m: 58.2M, 1b: 1.34B); tiny, the
    CPU-sized default, 0.24M with the byte vocabulary (the README's picture and quick start)."""
    count = lambda name, vocab: sum(p.numel() for p in tl.build_model(tl.parse_args(["--model", name]), vocab,
                                                                        device="meta").parameters())
    published = [name for name in llama_c4.MODEL_SHAPES if name != "tiny"]
    assert published == ["9m", "20m", "35m", "60m", "130m", "350m", "1b"]
    for name in published:
        size = float(name[:-1]) * {"m": 1e6, "b": 1e9}[name[-1]]
        assert 0.95 * size <= count(name, 32100) <= 1.35 * size, (name, count(name, 32100))
    assert round(count("tiny", llama_c4.ByteTokenizer.vocab_size) / 1e6, 2) == 0.24


def write_shard(path, records, raw_lines=(), truncate=False):
    lines = [json.dumps(r).encode() for r in records] + list(raw_lines)
    data = gzip.compress(b"\n".join(lines) + b"\n")
    path.write_bytes(data[: len(data) // 2] if truncate else data)


def docs(prefix, n):
    return [{"text": f"{prefix} document {i} " + "abc " * (i % 7), "timestamp": "2019", "url": f"u{i}"}
            for i in range(n)]


def token_stream(texts, tok):
    out = []
    for t in texts:
        out += tok.encode(t) + [tok.eos_id]
    return out


def test_packing_loses_and_duplicates_no_token(tmp_path):
    write_shard(tmp_path / "c4-train.00000-of-00002.json.gz", docs("a", 30))
    write_shard(tmp_path / "c4-train.00001-of-00002.json.gz", docs("b", 25))
    tok = llama_c4.ByteTokenizer()
    train, val = llama_c4.find_shards(str(tmp_path))
    assert len(train) == 2 and val == []
    seqs = list(llama_c4.TokenStream(train, tok, 16, epochs=1))
    assert all(s.shape == (17,) for s in seqs)
    stream = token_stream([d["text"] for d in docs("a", 30) + docs("b", 25)], tok)
    flat = torch.cat(seqs).tolist()
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 17


def batch_bytes(batches):
    """The byte text of (inputs, targets) batches: each row is x plus the last target."""
    rows = [torch.cat([x, y[:, -1:]], dim=1) for x, y in batches]
    return b"".join(bytes([t for t in row.tolist() if t < 256]) for r in rows for row in r)


def test_reading_resumes_after_the_last_text_yielded(tmp_path):
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", docs("a", 10))
    files, pos = llama_c4.find_shards(str(tmp_path))[0], {"file": 0, "line": 0}
    reader = llama_c4.read_documents(files, llama_c4.DataStats(), pos)
    first = [next(reader) for _ in range(3)]
    rest = list(llama_c4.read_documents(files, llama_c4.DataStats(), dict(pos)))  # from the saved position
    assert first + rest == [d["text"] for d in docs("a", 10)]


def test_every_epoch_packs_the_same_sequences(tmp_path):
    """An epoch's remainder is dropped, so epoch 2 starts where epoch 1 did."""
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", docs("a", 30))
    files = llama_c4.find_shards(str(tmp_path))[0]
    seqs = [s.tolist() for s in llama_c4.TokenStream(files, llama_c4.ByteTokenizer(), 16, epochs=2)]
    assert seqs[:len(seqs) // 2] == seqs[len(seqs) // 2:]


def test_the_shuffle_buffer_is_a_permutation_drawing_from_every_slot(tmp_path):
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", docs("a", 200))
    files, tok = llama_c4.find_shards(str(tmp_path))[0], llama_c4.ByteTokenizer()
    seqs = [s.tolist() for s in llama_c4.TokenStream(files, tok, 16, epochs=1)]
    shuffled = llama_c4.TrainBatches(llama_c4.TokenStream(files, tok, 16, epochs=1), 1, seed=0, size=4)
    out = [shuffled.next_sequence().tolist() for _ in range(len(seqs) - 4)]
    assert sorted(out + [s.tolist() for s in shuffled.buffer]) == sorted(seqs)  # nothing lost or repeated
    assert seqs[3] in out  # the last slot filled is drawn too


def test_train_and_validation_are_disjoint(tmp_path):
    tok = llama_c4.ByteTokenizer()
    # with validation shards
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", docs("train", 40))
    write_shard(tmp_path / "c4-validation.00000-of-00001.json.gz", docs("valid", 20))
    data = llama_c4.C4Data(str(tmp_path), tok, 16)
    assert [f.name for f in data.val_files] == ["c4-validation.00000-of-00001.json.gz"]
    val_text = batch_bytes(data.val_batches(2, 100))
    assert b"valid" in val_text and b"train" not in val_text
    # without: every 100th document is held out
    only = tmp_path / "only"
    only.mkdir()
    write_shard(only / "c4-train.00000-of-00001.json.gz", [{"text": f"doc{i:03d}|" * 3} for i in range(300)])
    data = llama_c4.C4Data(str(only), tok, 8)
    assert data.holdout
    train_docs = {t for t in llama_c4.read_documents(data.train_files, llama_c4.DataStats())}
    held = [f"doc{i:03d}|" * 3 for i in range(300) if i % 100 == 99]
    seen_train = b"".join(bytes([t for t in s.tolist() if t < 256]) for s in llama_c4.TokenStream(
        data.train_files, tok, 8, keep=lambda i: i % 100 != 99, epochs=1))
    seen_val = batch_bytes(data.val_batches(1, 1000))
    for h in held:
        assert h.encode() not in seen_train
    for h in held[:-1]:  # the last one may end in the unpacked remainder
        assert h.encode() in seen_val
    assert len(train_docs) == 300


def test_ddp_ranks_get_disjoint_slices(tmp_path):
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", [{"text": f"<{i}>" * 20} for i in range(40)])
    tok = llama_c4.ByteTokenizer()
    files, _ = llama_c4.find_shards(str(tmp_path))
    per_rank = [b"".join(bytes([t for t in s.tolist() if t < 256])
                         for s in llama_c4.TokenStream(files, tok, 8, rank=r, world=2, epochs=1)) for r in range(2)]
    for i in range(40):
        owners = [f"<{i}><{i}><{i}>".encode() in seen for seen in per_rank]
        assert owners.count(True) <= 1
    assert b"<0>" in per_rank[0] and b"<1>" in per_rank[1] and b"<1><1>" not in per_rank[0]


def bad_data_folder(path):
    """5 good documents with 2 undecodable lines and 2 without text, a truncated shard, a plain JSON file."""
    write_shard(path / "c4-train.00000-of-00003.json.gz", docs("ok", 5),
                raw_lines=[b"{not json", b'{"text": "\xff\xfe bad utf8"}', b'{"url": "no text here"}', b"[1, 2]"])
    write_shard(path / "c4-train.00001-of-00003.json.gz", docs("cut", 200), truncate=True)
    (path / "c4-train.00002-of-00003.json").write_text(json.dumps({"text": "plain json file"}) + "\n")


def test_bad_data_is_skipped_and_counted(tmp_path, capsys):
    bad_data_folder(tmp_path)
    files, _ = llama_c4.find_shards(str(tmp_path))
    stats = llama_c4.DataStats()
    texts = list(llama_c4.read_documents(files, stats))
    assert stats.bad_lines == 2 and stats.no_text == 2 and stats.bad_shards == 1
    assert texts[:5] == [d["text"] for d in docs("ok", 5)] and texts[-1] == "plain json file"
    assert "skipping the rest" in capsys.readouterr().err


def test_bad_data_is_counted_and_warned_about_once_however_often_it_repeats(tmp_path, capsys):
    """2 bad lines count as 2 skipped lines and give one warning, however often the data repeats."""
    bad_data_folder(tmp_path)
    write_shard(tmp_path / "c4-train.00003-of-00003.json.gz", docs("more", 150))
    data = llama_c4.C4Data(str(tmp_path), llama_c4.ByteTokenizer(), 16)
    data.val_batches(2, 4)  # the held-out pass reads every shard too
    batches = data.train_batches(2, seed=0, shuffle_buffer=0)
    for _ in range(300):  # many epochs of this small data set
        next(batches)
    s = data.stats
    assert (s.bad_lines, s.no_text, s.bad_shards) == (2, 2, 1)
    assert capsys.readouterr().err.count("skipping the rest") == 1
    assert s.report() == "data: skipped 2 undecodable lines, 2 records without text, 1 unreadable shards"
    assert llama_c4.DataStats(documents=5).report() is None  # nothing skipped: nothing to say


def test_documents_count_once_over_many_epochs(tmp_path):
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", docs("a", 150))
    data = llama_c4.C4Data(str(tmp_path), llama_c4.ByteTokenizer(), 16)
    data.val_batches(1, 1)  # the held-out pass reads the same shard
    batches = data.train_batches(2, seed=0, shuffle_buffer=0)
    for _ in range(500):
        next(batches)
    assert batches.stream.pos["epoch"] >= 2 and data.stats.documents == 150


def test_an_empty_held_out_set_is_named_as_the_problem(tmp_path):
    """fewer than 100 documents and no validation shard."""
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", docs("few", 60))
    with pytest.raises(llama_c4.DataError, match="held-out validation set is empty.*60 documents"):
        llama_c4.C4Data(str(tmp_path), llama_c4.ByteTokenizer(), 16).val_batches(2, 4)
    with pytest.raises(SystemExit, match="held-out validation set is empty"):
        tl.main(["--data", str(tmp_path), "--out-dir", str(tmp_path / "out")])


def test_missing_or_empty_data_path_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        llama_c4.find_shards(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no C4 shards"):
        llama_c4.find_shards(str(tmp_path))
    with pytest.raises(SystemExit, match="nope: no such file"):
        tl.main(["--data", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "out")])


def test_lr_schedule():
    lr = lambda it: tl.get_lr(it, 1.0, 10, 100, 0.1)
    assert lr(0) < lr(5) < lr(9) <= 1.0  # warmup
    assert lr(10) == pytest.approx(1.0) and lr(55) == pytest.approx(0.55)  # cosine midpoint
    assert lr(100) == lr(500) == pytest.approx(0.1)  # floor


@pytest.fixture(scope="session")
def xdg_cache(tmp_path_factory):
    """An XDG_CACHE_HOME holding the embedded corpus, where --cache-dir looks by default. The corpus
    is built with the network refused: it must come from this Python's own files, with no download."""
    xdg = tmp_path_factory.mktemp("xdg")

    def refused(*args, **kwargs):
        raise OSError("the embedded corpus must not need the network")
    real = socket.socket.connect, socket.getaddrinfo
    socket.socket.connect, socket.getaddrinfo = refused, refused
    try:
        llama_c4.build_embedded_corpus(xdg / "lowrank_adam")
    finally:
        socket.socket.connect, socket.getaddrinfo = real
    return xdg


@pytest.fixture(scope="session")
def corpus(xdg_cache):
    return str(llama_c4.build_embedded_corpus(xdg_cache / "lowrank_adam"))


@pytest.mark.slow
def test_a_late_resume_reads_at_most_one_shard_and_continues_exactly(corpus, tmp_path):
    tok = llama_c4.ByteTokenizer()
    data = llama_c4.C4Data(corpus, tok, 64)
    batches = data.train_batches(4, seed=0, shuffle_buffer=50)
    while batches.stream.pos["file"] < 2 or batches.stream.pos["epoch"] < 1:  # late: the 2nd epoch, 3rd shard
        next(batches)
    torch.save(llama_c4.saveable(batches.state_dict()), tmp_path / "data.pt")
    saved = dict(batches.stream.pos)
    expected = [next(batches) for _ in range(60)]  # enough to read on from the saved line
    fresh = llama_c4.C4Data(corpus, tok, 64)
    resumed = fresh.train_batches(4, seed=0, shuffle_buffer=50)
    resumed.load_state_dict(torch.load(tmp_path / "data.pt", weights_only=True))
    got = []
    while fresh.stats.lines_read == 0:  # up to the first line the resumed stream reads
        got.append(next(resumed))
    # getting back to the saved position read (unparsed) only the lines before it in its own shard;
    # every other line read is a document it went on to use
    assert fresh.stats.lines_read - fresh.stats.documents == saved["line"]
    got += [next(resumed) for _ in range(60 - len(got))]
    assert all(torch.equal(a, b) for x, y in zip(expected, got) for a, b in zip(x, y))


def test_prefetch_gives_the_same_batches_and_the_state_of_the_last_taken(corpus):
    tok = llama_c4.ByteTokenizer()
    plain = llama_c4.C4Data(corpus, tok, 32).train_batches(2, seed=1, shuffle_buffer=10)
    ahead = llama_c4.Prefetch(llama_c4.C4Data(corpus, tok, 32).train_batches(2, seed=1, shuffle_buffer=10), depth=4)
    for _ in range(6):
        a, b = next(plain), next(ahead)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    time.sleep(0.2)  # the worker is ahead now; the state must still be the one after the 6th batch
    assert ahead.state["stream"] == plain.state_dict()["stream"] and ahead.state["rng"] == plain.rng.getstate()
    ahead.close()


def test_prefetch_passes_on_the_end_of_the_data_and_closes_with_a_full_queue():
    class RunsDry:  # one batch, then the data runs dry
        taken = 0

        def __next__(self):
            self.taken += 1
            if self.taken > 1:
                raise llama_c4.DataError("dry")
            return torch.zeros(1, 2), torch.ones(1, 2)

        def state_dict(self):
            return {"taken": self.taken}
    ahead = llama_c4.Prefetch(RunsDry(), depth=1)
    time.sleep(0.3)  # the queue holds the batch; the worker has the error and no room for it
    closer = threading.Thread(target=ahead.close, daemon=True)
    closer.start()
    closer.join(5)
    assert not closer.is_alive()  # close() came back: the worker gave up waiting for room
    ahead = llama_c4.Prefetch(RunsDry(), depth=1)
    assert torch.equal(next(ahead)[1], torch.ones(1, 2)) and ahead.state == {"taken": 1}
    with pytest.raises(llama_c4.DataError, match="dry"):
        next(ahead)
    ahead.close()


def test_embedded_corpus_is_c4_format(corpus):
    train, val = llama_c4.find_shards(corpus)
    assert len(train) == 4 and len(val) == 1
    assert all(f.name.startswith("c4-train.") and f.name.endswith("-of-00004.json.gz") for f in train)
    with gzip.open(val[0], "rt") as fh:
        rec = json.loads(fh.readline())
    assert set(rec) == {"text", "timestamp", "url"} and len(rec["text"]) > 100


def test_embedded_validation_documents_are_not_trained_on(corpus):
    train, val = llama_c4.find_shards(corpus)
    urls = lambda files: [json.loads(line)["url"] for f in files for line in gzip.open(f, "rt")]
    train_urls, val_urls = urls(train), urls(val)
    assert not set(train_urls) & set(val_urls) and len(val_urls) > 0
    assert len(train_urls) + len(val_urls) == int((Path(corpus) / "DONE").read_text().split()[0])  # every document


def test_the_embedded_corpus_is_pythons_own_documentation_of_the_size_the_readme_gives(corpus):
    """The README: "the text every Python ships (about 2.3 MB)": pydoc's topics and the standard library's
    docstrings, within a quarter of the size it states (it varies with the Python version). Built by the
    xdg_cache fixture with the network refused: no download."""
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    stated = float(re.search(r"the text every Python ships \(about ([\d.]+) MB\)", readme).group(1))
    records = [json.loads(line) for f in sum(llama_c4.find_shards(corpus), []) for line in gzip.open(f, "rt")]
    kinds = {re.match(r"python://(pydoc/topics|stdlib)/", r["url"]).group(1) for r in records}
    assert kinds == {"pydoc/topics", "stdlib"}
    size = sum(len(r["text"].encode()) for r in records) / 1e6
    assert 0.75 * stated <= size <= 1.25 * stated, size


def test_the_ctrl_c_handler_stops_once_and_is_restored():
    before = signal.getsignal(signal.SIGINT)
    with llama_c4.stop_on_first_ctrl_c() as stop_requested:
        assert not stop_requested()
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C only asks the loop to stop
        assert stop_requested()
    assert signal.getsignal(signal.SIGINT) is before


SMALL = ["--quiet", "--max-steps", "6", "--eval-interval", "3", "--batch-size", "2", "--seq-len", "32",
         "--val-batches", "2", "--update-proj-gap", "4", "--shuffle-buffer", "50", "--warmup-steps", "2"]


def history(out_dir):
    """metrics.jsonl without its timings: what must be identical between two runs."""
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "final")} for r in rows]


@pytest.mark.parametrize("opt", list(tl.OPTIMIZERS))
@pytest.mark.slow
def test_script_trains_and_resumes_exactly(opt, corpus, tmp_path, capsys):
    common = SMALL + ["--data", corpus, "--optimizer", opt]
    a, b = tmp_path / "a", tmp_path / "b"
    full = tl.main(common + ["--out-dir", str(a)])
    assert math.isfinite(full["val_loss"]) and full["steps"] == 6 and full["state_mb"] > 0
    part = tl.main(common + ["--out-dir", str(b), "--stop-after", "4"])
    assert part["steps"] == 4
    assert (f"stopped at step 4 of 6 (--stop-after 4): checkpoint saved to {b / 'ckpt.pt'}; continue with: "
            f"python train_tiny_llama.py --resume --out-dir {b}") in capsys.readouterr().out
    shutil.copy(b / "ckpt.pt", tmp_path / "step4.pt")
    resumed = tl.main(common + ["--out-dir", str(b), "--resume"])
    assert resumed["steps"] == 6 and resumed["val_loss"] == full["val_loss"]
    ckpt_a, ckpt_b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(ckpt_a["model"][k], ckpt_b["model"][k]) for k in ckpt_a["model"])
    assert history(b) == history(a) and "final" in json.loads(open(a / "metrics.jsonl").readlines()[-1])
    # a crash after step 6 but before the final save: resuming the step-4 checkpoint drops the
    # rows after step 4 before it logs them again, so every step appears once
    shutil.copy(tmp_path / "step4.pt", b / "ckpt.pt")
    assert tl.main(common + ["--out-dir", str(b), "--resume"])["val_loss"] == full["val_loss"]
    assert history(b) == history(a)


def test_a_resumed_run_reports_whole_run_timings_and_a_complete_run_its_saved_result(corpus, tmp_path, capsys):
    common = SMALL + ["--data", corpus, "--out-dir", str(tmp_path)]
    tl.main(common + ["--stop-after", "3"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["timing"] = {"seconds": 1000.0, "step_seconds": 3.0}  # as if the first 3 steps had taken that long
    torch.save(ckpt, tmp_path / "ckpt.pt")
    resumed = tl.main(common + ["--resume"])
    assert resumed["steps"] == 6 and 1000 < resumed["seconds"] < 1100 and resumed["step_ms"] > 3000 / 6
    assert resumed["tokens_per_s"] == pytest.approx(6 * 2 * 32 / resumed["seconds"])
    again = tl.main(common + ["--resume"])
    assert again == resumed
    assert "is complete (6 steps); its saved result" in capsys.readouterr().out


def test_an_existing_run_is_never_overwritten(corpus, tmp_path):
    """A second run into the same --out-dir must not overwrite ckpt.pt or append to metrics.jsonl."""
    common = SMALL + ["--data", corpus, "--out-dir", str(tmp_path)]
    tl.main(common + ["--stop-after", "2"])
    before = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="already holds a run .ckpt.pt, metrics.jsonl.: add --resume"):
        tl.main(common)
    assert ((tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()) == before
    (tmp_path / "ckpt.pt").unlink()  # a run that died before its first checkpoint: still refused
    with pytest.raises(SystemExit, match="already holds a run .metrics.jsonl."):
        tl.main(common)


def test_resume_without_a_checkpoint_is_refused_and_touches_nothing(corpus, tmp_path, capsys):
    """--resume into a mistyped --out-dir (or a run that saved no checkpoint) must not train a new run there."""
    typo = tmp_path / "typo"
    with pytest.raises(SystemExit, match=rf"--resume: no checkpoint in {re.escape(str(typo))}: nothing to "
                                         r"continue; check --out-dir, or start a new run without --resume"):
        tl.main(SMALL + ["--data", corpus, "--resume", "--out-dir", str(typo)])
    assert not typo.exists() and capsys.readouterr().out == ""
    typo.mkdir()
    (typo / "metrics.jsonl").write_text('{"step": 0}\n')  # a run that died before its first checkpoint
    with pytest.raises(SystemExit, match="--resume: no checkpoint in"):
        tl.main(SMALL + ["--data", corpus, "--resume", "--out-dir", str(typo)])
    assert [f.name for f in typo.iterdir()] == ["metrics.jsonl"]
    assert (typo / "metrics.jsonl").read_text() == '{"step": 0}\n'


@pytest.mark.parametrize("flags", [["--optimizer", "adamw"], ["--optimizer", "galore"],
                                   ["--optimizer", "galore", "--grad-clip", "0"]],  # no norm: galore's own check
                         ids=["adamw", "galore", "galore-no-clipping"])
def test_a_diverging_run_stops_at_once_and_the_same_command_with_a_lower_lr_starts_anew(flags, corpus, tmp_path):
    """--lr 1e9 stops at the first non-finite loss or gradient with one line, saving nothing; its log is kept
    aside, so the folder takes the same command with a lower --lr without --resume."""
    common = SMALL + ["--data", corpus, "--out-dir", str(tmp_path), "--log-interval", "1", *flags]
    with pytest.raises(SystemExit) as e:
        tl.main(common + ["--lr", "1e9"])
    step = int(re.fullmatch(rf"error: diverged at step (\d+) of 6 \(a non-finite loss or gradient\): lower --lr; "
                            rf"this run's log is kept as {re.escape(str(tmp_path))}/metrics.diverged.jsonl, and the "
                            rf"folder is free for a new run", str(e.value.code)).group(1))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["metrics.diverged.jsonl"]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.diverged.jsonl")]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, step))  # the steps that were finite
    assert all(math.isfinite(r["train_loss"]) for r in rows if "train_loss" in r) and rows[-1] == dict(
        step=step, diverged=True)
    with pytest.raises(SystemExit, match="no checkpoint in .*: the run there diverged .see its metrics.diverged"):
        tl.main(["--resume", "--out-dir", str(tmp_path)])
    assert tl.main(common + ["--lr", "1e-3"])["steps"] == 6  # the corrected command, in the same folder


def test_a_run_diverging_after_a_checkpoint_sets_the_checkpoint_aside_too(corpus, tmp_path, monkeypatch):
    """Both files of the run are renamed *.diverged.*: a checkpoint left as ckpt.pt would make the same
    command refuse the folder (and a resume, which may not lower --lr, diverge again)."""
    step = tl.train_step

    def poisoned(run, batches):  # the weights turn NaN after the step-2 checkpoint: step 4's loss is NaN
        if run.step == 3:
            with torch.no_grad():
                run.raw_model.lm_head.weight.fill_(math.nan)
        return step(run, batches)
    monkeypatch.setattr(tl, "train_step", poisoned)
    common = SMALL + ["--data", corpus, "--out-dir", str(tmp_path), "--save-interval", "2"]
    with pytest.raises(SystemExit) as e:
        tl.main(common)
    assert str(e.value.code) == (
        f"error: diverged at step 4 of 6 (a non-finite loss or gradient): lower --lr; this run's log and last "
        f"checkpoint are kept as {tmp_path / 'metrics.diverged.jsonl'} and {tmp_path / 'ckpt.diverged.pt'}, and the "
        f"folder is free for a new run")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt.diverged.pt", "metrics.diverged.jsonl"]
    assert torch.load(tmp_path / "ckpt.diverged.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(tl, "train_step", step)
    assert tl.main(common)["steps"] == 6  # the same command starts anew in that folder


def test_grad_accum_steps_once_on_the_mean_gradient_of_its_micro_batches(corpus, tmp_path):
    """--batch-size 1 --grad-accum 2 takes the sequences of --batch-size 2 and makes its steps, to float
    rounding; one micro-batch alone (no accumulation) makes other steps."""
    common = SMALL + ["--data", corpus, "--max-steps", "3", "--log-interval", "1"]
    one = ["--batch-size", "1", "--val-batches", "4"]  # (the same 4 validation sequences as 2 batches of 2)
    tl.main(common + ["--batch-size", "2", "--out-dir", str(tmp_path / "batch2")])
    tl.main(common + one + ["--grad-accum", "2", "--out-dir", str(tmp_path / "accum")])
    tl.main(common + one + ["--out-dir", str(tmp_path / "batch1")])
    batch2, accum, batch1 = (final_weights(tmp_path / d) for d in ("batch2", "accum", "batch1"))
    for k in batch2:
        torch.testing.assert_close(accum[k], batch2[k], rtol=1e-4, atol=1e-5)
    assert max((batch1[k] - batch2[k]).abs().max() for k in batch2) > 1e-3
    losses = {d: [r["train_loss"] for r in history(tmp_path / d) if "train_loss" in r] for d in ("batch2", "accum")}
    assert losses["accum"] == pytest.approx(losses["batch2"], rel=1e-5)  # the loss of the whole batch, each step


def test_grad_clip_scales_the_gradients_down_to_the_global_norm_given(corpus, tmp_path):
    """Clipped to a global norm of 1e-9, AdamW's gradients sink far below its eps, and the weights barely move;
    unclipped (--grad-clip 0) they move by about the lr per step."""
    common = SMALL + ["--data", corpus, "--max-steps", "3"]
    moved = {}
    for clip in ("0", "1e-9"):
        tl.main(common + ["--grad-clip", clip, "--out-dir", str(tmp_path / clip)])
        torch.manual_seed(0)  # the run's initial weights: --seed 0
        start = tl.build_model(tl.parse_args(common), llama_c4.ByteTokenizer.vocab_size).state_dict()
        moved[clip] = sum((w - start[k]).abs().sum().item() for k, w in final_weights(tmp_path / clip).items())
    assert 0 < moved["1e-9"] < 1e-2 * moved["0"]


def test_a_run_steps_with_the_warmup_and_cosine_schedule(corpus, tmp_path):
    """Each step's lr (logged, and set in the optimizer) is get_lr's: a linear warmup, then a cosine decay."""
    tl.main(SMALL + ["--data", corpus, "--out-dir", str(tmp_path), "--log-interval", "1", "--lr", "1e-2",
                     "--stop-after", "5"])
    expected = [tl.get_lr(step, 1e-2, 2, 6, 0.1) for step in range(5)]  # SMALL: --warmup-steps 2, --max-steps 6
    assert expected[0] < expected[1] < expected[2] == 1e-2 > expected[3] > expected[4]
    assert [r["lr"] for r in history(tmp_path) if "train_loss" in r] == expected
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert {g["lr"] for g in ckpt["optimizer"]["param_groups"]} == {expected[-1]}  # what the last step used


@pytest.mark.slow
def test_compile_trains_through_torch_compile_and_resumes_exactly_without_it(corpus, tmp_path, monkeypatch):
    """--compile: the model that trains is torch.compile's (here with dynamo's "eager" backend, which traces
    the model as inductor does but generates no code: seconds instead of minutes on a CPU). Its checkpoint
    holds the plain model's weights, so a resume without --compile (a flag a resume may change) continues
    it, and ends where an uncompiled run does."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, backend=backend))
    common = SMALL + ["--data", corpus]
    try:
        tl.main(common + ["--out-dir", str(tmp_path / "plain")])
        assert graphs == []
        tl.main(common + ["--out-dir", str(tmp_path / "compiled"), "--compile", "--stop-after", "3"])
        assert graphs  # the training steps ran through the compiled model
        saved = torch.load(tmp_path / "compiled" / "ckpt.pt", weights_only=True)
        assert saved["model"].keys() == final_weights(tmp_path / "plain").keys()  # no torch.compile prefix
        tl.main(common + ["--out-dir", str(tmp_path / "compiled"), "--resume"])
    finally:
        torch._dynamo.reset()
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "compiled")
    assert all(torch.equal(a[k], b[k]) for k in a)


def autocast_forward(device, *flags):
    """(the logits' dtype, whether a GradScaler is on) of a run's model called in the run's autocast context."""
    args = tl.parse_args(["--seq-len", "8", *flags])
    run = tl.Run(args, llama_c4.ByteTokenizer.vocab_size, llama_c4.Dist(False, 0, 1, device))
    with run.ctx:
        logits, _ = run.model(torch.randint(0, 257, (1, 8), device=device))
    return logits.dtype, run.scaler.is_enabled()


def test_autocast_is_off_on_the_cpu():
    assert autocast_forward("cpu") == autocast_forward("cpu", "--dtype", "float16") == (torch.float32, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_autocast_is_bf16_on_cuda_or_the_dtype_given():
    """--dtype bfloat16 (the default) on CUDA; float16 with a GradScaler; float32: no autocast."""
    assert autocast_forward("cuda") == (torch.bfloat16, False)
    assert autocast_forward("cuda", "--dtype", "float16") == (torch.float16, True)
    assert autocast_forward("cuda", "--dtype", "float32") == (torch.float32, False)


def test_a_run_that_fails_before_its_first_step_leaves_nothing_behind(corpus, tmp_path):
    # an empty train shard: the run fails at its first batch, after metrics.jsonl was opened
    bad = tmp_path / "bad"
    bad.mkdir()
    write_shard(bad / "c4-train.00000-of-00001.json.gz", [])
    write_shard(bad / "c4-validation.00000-of-00001.json.gz", docs("val", 64))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="hold 0 usable documents"):
        tl.main(SMALL + ["--data", str(bad), "--out-dir", str(out)])
    assert not out.exists()  # created by the run, so removed with it
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="hold 0 usable documents"):
        tl.main(SMALL + ["--data", str(bad), "--out-dir", str(out)])
    assert [f.name for f in out.iterdir()] == ["notes.txt"]  # a folder of the user's: only the run's file goes
    tl.main(SMALL + ["--data", corpus, "--out-dir", str(out), "--max-steps", "3"])  # the same folder, no --resume
    assert (out / "ckpt.pt").exists()


def test_unusable_training_data_is_described_per_split_with_what_was_skipped(tmp_path):
    # the validation split's documents are not counted as training documents, and the
    # skipped lines of the training shards are named
    write_shard(tmp_path / "c4-validation.00000-of-00001.json.gz", docs("val", 64))
    train = tmp_path / "c4-train.00000-of-00001.json.gz"
    write_shard(train, [{"url": "no text"}], raw_lines=[b"{not json"])
    with pytest.raises(SystemExit) as e:
        tl.main(SMALL + ["--data", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert str(e.value.code) == (
        "error: the training shards (1: c4-train.00000-of-00001.json.gz) hold 0 usable documents (skipped: 1 "
        'undecodable or non-JSON lines, 1 records without a "text" string, 0 unreadable shards): add training '
        'documents (JSON lines with a "text" field)')
    write_shard(train, docs("short", 2))  # documents, but too few tokens for one sequence
    with pytest.raises(SystemExit, match=r"hold 2 usable documents; the 2 of them for rank 0 give no sequence of "
                                         r"513 tokens: use more data or a shorter --seq-len"):
        tl.main(SMALL + ["--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--seq-len", "512"])



def test_shards_that_cannot_be_read_are_named_as_the_problem(tmp_path):
    """Shards that are not gzip (or cannot be read at all) are named with their error, not given --seq-len advice."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "validation"):
        (bad / f"c4-{split}.00000-of-00001.json.gz").write_text('{"text": "plain text, not gzip"}\n')
    message = (r"error: the {} shards cannot be read \(1: c4-{}\.00000-of-00001\.json\.gz: Not a gzipped file "
               r"\(b'{{\"'\)\): a shard must be gzip-compressed JSON lines \(\.json\.gz, \.jsonl\.gz\) or plain JSON "
               r"lines \(\.json, \.jsonl\), one document a line")
    # every shard (the validation pass reads first), then the training shard alone (its held-out documents)
    for data, split, name in [("*", "validation", "validation"), ("c4-train.*", "training", "train")]:
        with pytest.raises(SystemExit) as e:
            tl.main(SMALL + ["--data", str(bad / data), "--out-dir", str(tmp_path / "out")])
        assert re.fullmatch(message.format(split, name), str(e.value.code)), e.value.code
        assert not (tmp_path / "out").exists()
    write_shard(bad / "c4-validation.00000-of-00001.json.gz", docs("val", 64))  # only the training shard is bad
    with pytest.raises(SystemExit) as e:
        tl.main(SMALL + ["--data", str(bad), "--out-dir", str(tmp_path / "out")])
    assert re.fullmatch(message.format("training", "train"), str(e.value.code)), e.value.code
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_resume_with_other_settings_is_refused_naming_them(corpus, tmp_path):
    """A rank-16 checkpoint resumed with --rank 8 must not silently train on at rank 16."""
    common = SMALL + ["--data", corpus, "--out-dir", str(tmp_path), "--optimizer", "galore"]
    tl.main(common + ["--rank", "16", "--stop-after", "2"])
    with pytest.raises(SystemExit, match=r"other settings: --rank 16 \(now 8\), --max-steps 6 \(now 9\)\. A "
                                         r"resume may only change --stop-after, --save-interval"):
        tl.main(common + ["--rank", "8", "--max-steps", "9", "--resume"])
    with pytest.raises(SystemExit, match=r"--optimizer galore \(now adamw\)"):
        tl.main(common + ["--rank", "16", "--optimizer", "adamw", "--resume"])
    # what may change: reporting, checkpoint cadence, device, threads...
    done = tl.main(common + ["--rank", "16", "--resume", "--eval-interval", "2", "--log-interval", "1",
                             "--threads", "1", "--save-interval", "1"])
    assert done["steps"] == 6


@pytest.mark.slow
def test_a_resume_may_change_the_bookkeeping_flags_the_readme_lists_and_no_other(corpus, tmp_path):
    """The README: a resume "refuses a different value for any flag but the bookkeeping ones (`--stop-after`,
    the intervals, ...)". Every flag of the script, given another value, is checked against the checkpoint
    as main checks it; then a resume that changes every listed flag but --compile (which has its own test)
    continues the run."""
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    listed = re.search(r"refuses a different value for any flag but the bookkeeping ones \((.*?)\)\.", readme)[1]
    flags = {a.option_strings[0]: a.dest for a in tl.build_parser()._actions if a.dest != "help"}
    may_change = set(re.findall(r"`(--[\w-]+)`", listed))
    may_change |= {f for f in flags if f.endswith("-interval")} if "the intervals" in listed else set()
    assert may_change <= set(flags) and len(may_change) == 10
    tl.main(SMALL + ["--data", corpus, "--out-dir", str(tmp_path), "--stop-after", "2"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for flag, dest in flags.items():
        if flag in ("--resume", "--out-dir"):  # what names the run to continue
            continue
        args = tl.parse_args(["--resume", "--out-dir", str(tmp_path)], ckpt["settings"])
        setattr(args, dest, ("another value", getattr(args, dest)))
        if flag in may_change:
            tl.check_resume(args, ckpt)
        else:
            with pytest.raises(SystemExit, match=f"made with other settings: {re.escape(flag)} "):
                tl.check_resume(args, ckpt)
    done = tl.main(["--resume", "--out-dir", str(tmp_path), "--stop-after", "3", "--save-interval", "1",
                    "--eval-interval", "1", "--log-interval", "1", "--device", "cpu", "--threads", "1",
                    "--peak-tflops", "1", "--cache-dir", str(tmp_path / "elsewhere")])  # and not --quiet
    assert done["steps"] == 5


def test_corrupt_checkpoints_error_clearly(corpus, tmp_path):
    common = SMALL + ["--data", corpus, "--out-dir", str(tmp_path)]
    tl.main(common + ["--stop-after", "2"])
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="corrupt"):
        tl.main(common + ["--resume"])
    torch.save({"model": {}}, ckpt)
    with pytest.raises(SystemExit, match="not a checkpoint of this script"):
        tl.main(common + ["--resume"])


BAD_FLAGS = [  # every flag's bad values: one clear line each
    (["--lr", "-0.001", "--optimizer", "galore"], "--lr -0.001: must be a number > 0"),
    (["--lr", "0"], "--lr 0.0: must be a number > 0"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--lr", "galore=1e-2"], "argument --lr: invalid float value: 'galore=1e-2'"),  # NAME=LR is bench.py compare's
    (["--rank", "0"], "--rank 0: must be an integer >= 1"),
    (["--max-steps", "0"], "--max-steps 0: must be an integer >= 1"),
    (["--beta1", "1.0"], "--beta1 1.0: must be in [0, 1)"),
    (["--weight-decay", "nan"], "--weight-decay nan: must be a number >= 0"),
    (["--seq-len", "x"], "argument --seq-len: invalid int value: 'x'"),
    (["--model", "2b"], "argument --model: invalid choice: '2b'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--optimizer", "galore:gap"], "galore has no variant :gap; it has :svd, :random, :gha, +residual, +noresidual"),
    (["--optimizer", "adaptive:nope"], "adaptive has no variant :nope"),
    (["--optimizer", "galore", "--norm-growth-limit", "0.5"], "Invalid norm_growth_limit: 0.5"),
    (["--optimizer", "adapprox", "--beta1", "0", "--cosine-guidance"], "Invalid cosine_guidance"),
    (["--eos-token", "</s>"], "--eos-token names a token of --tokenizer, which is not given"),
    (["--device", "tpu"], "--device tpu: not a device"),
    (["--device", "mps"], "--device mps: not a device this script runs on"),
    (["--data", "/nonexistent/c4"], "--data /nonexistent/c4: no such file or directory"),
    (["--optimizer", "galore", "--rank", "1000"], "--rank 1000: larger than 64, the short side of the tiny model's "
                                                  "attn/mlp matrices; use at most 64"),
    (["--optimizer", "ldadam", "--rank", "65"], "--rank 65: larger than 64"),
    (["--optimizer", "adapprox", "--rank", "65"], "--rank 65: larger than 64"),
    (["--warmup-steps", "500", "--max-steps", "20"], "--warmup-steps 500 with --max-steps 20: the lr would never "
                                                      "reach its peak"),
    (["--warmup-steps", "20", "--max-steps", "20"], "--warmup-steps 20 with --max-steps 20"),
    (["--stagger"], "--stagger: adamw has no staggered refresh schedule (an option of galore"),
    (["--optimizer", "ldadam", "--stagger"], "--stagger: ldadam has no staggered refresh schedule"),
]


def test_the_default_warmup_fits_a_short_run_and_a_rank_at_the_short_side_is_allowed():
    assert tl.parse_args(["--max-steps", "20"]).warmup_steps == 2  # a tenth of a short run
    assert tl.parse_args([]).warmup_steps == 30
    assert tl.parse_args(["--max-steps", "20", "--warmup-steps", "19"]).warmup_steps == 19
    assert tl.parse_args(["--optimizer", "galore", "--rank", "64"]).rank == 64
    assert tl.parse_args(["--rank", "1000"]).rank == 1000  # AdamW has no rank: nothing to check


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_fail_before_anything_is_read_with_one_line(argv, message, tmp_path, monkeypatch):
    for module, name in ((llama_c4, "build_embedded_corpus"), (llama_c4, "C4Data"), (tl, "load_tokenizer")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("read data before checking the flags"))
    with pytest.raises(SystemExit) as e:
        tl.main(argv + ["--out-dir", str(tmp_path / "out")])
    text = str(e.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not (tmp_path / "out").exists()  # nothing written either


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch_fails_up_front(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: no such CUDA device .*use --device cpu"):
        tl.main(["--device", "cuda", "--out-dir", str(tmp_path)])


def test_unwritable_out_dir_and_bad_tokenizer_fail_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_c4, "build_embedded_corpus",
                        lambda *a: pytest.fail("read data before checking the flags"))
    (tmp_path / "file").write_text("")
    # (a read-only folder is no test as root, so: a folder that cannot be created, under a file)
    with pytest.raises(SystemExit, match="--out-dir .*file/out: cannot write there"):
        tl.main(["--out-dir", str(tmp_path / "file" / "out")])
    (tmp_path / "tok.json").write_text("this is not JSON")
    with pytest.raises(SystemExit, match="--tokenizer .*tok.json: not a tokenizer.json .not JSON"):
        tl.main(["--tokenizer", str(tmp_path / "tok.json"), "--out-dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="missing.json: No such file"):
        tl.main(["--tokenizer", str(tmp_path / "missing.json"), "--out-dir", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_bad_flag_on_the_command_line_is_one_line_on_stderr(tmp_path):
    """Runs the script as a process: exit status 1, one line, no traceback."""
    out = subprocess.run([sys.executable, "train_tiny_llama.py", "--rank", "0", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "error: --rank 0: must be an integer >= 1\n"


def test_compare_lr_takes_a_number_or_a_table_where_the_full_spec_wins():
    table = "galore=2e-2,galore+residual=3e-2,adamw=1e-3"
    assert bench.peak_lr("galore+residual", table) == 3e-2 and bench.peak_lr("galore:random", table) == 2e-2
    assert bench.peak_lr("adamw", table) == 1e-3 and bench.peak_lr("ldadam", table) == tl.OPTIMIZERS["ldadam"].lr
    assert bench.peak_lr("adapprox", "5e-4") == 5e-4 and bench.peak_lr("adafactor", None) == 1e-2


def test_compare_checks_every_run_before_training_any(corpus, tmp_path, capsys):
    """`--lr galore=1e-2x` is refused before any run starts, not after the AdamW run."""
    out = tmp_path / "cmp"
    for argv, message in [(["--lr", "galore=1e-2x"], "'1e-2x' is not a number"),
                          (["--lr", "galore=-1e-3"], "--lr galore=-1e-3: a learning rate must be a number > 0"),
                          (["--lr", "adamw=1e-3,sgd=1e-2"], "unknown optimizer 'sgd'"),
                          (["--lr-sweep", "1,x"], "--lr-sweep 1,x: not a comma list"),
                          (["--optimizer", "adamw,galore:gap"], "galore has no variant :gap"),
                          (["--optimizer", "adamw,galore,adamw"], "names a spec twice; for repeats use --seeds"),
                          (["--lr", "ldadam=1e-3"], "ldadam is not among --optimizer adamw,galore")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            bench.main(["compare", "--optimizer", "adamw,galore", *argv, "--data", corpus, "--out-dir", str(out)])
        assert not list(out.glob("*/metrics.jsonl"))
    bench.main(["compare", "--optimizer", "adamw", *SMALL, "--data", corpus, "--out-dir", str(out),
                "--stop-after", "2"])
    with pytest.raises(SystemExit, match="adamw-seed0 already holds a run"):  # checked before galore trains
        bench.main(["compare", "--optimizer", "galore,adamw", *SMALL, "--data", corpus, "--out-dir", str(out)])
    assert not (out / "galore-seed0" / "metrics.jsonl").exists()


def block_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_plot_without_matplotlib_fails_before_training(corpus, tmp_path, monkeypatch):
    """--plot without matplotlib is refused before training, not after."""
    block_matplotlib(monkeypatch)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        bench.main(["compare", "--optimizer", "adamw,galore", *SMALL, "--data", corpus, "--out-dir", str(tmp_path),
                    "--plot"])
    assert not list(tmp_path.glob("*/metrics.jsonl"))


def test_output_is_plain_lines_and_quiet_keeps_evaluations(corpus, tmp_path, capsys):
    """Piped output is plain lines (no \\r-joined progress bar), and --quiet keeps the evaluation lines."""
    common = [a for a in SMALL if a != "--quiet"] + ["--data", corpus, "--log-interval", "2"]
    tl.main(common + ["--out-dir", str(tmp_path / "a")])
    out, err = capsys.readouterr()
    assert "\r" not in out + err and err == ""
    assert [line for line in out.splitlines() if line.startswith("step ")] == [
        line for line in out.splitlines() if re.fullmatch(r"step (\d/6: train loss [\d.]+, lr [\d.e-]+, [\d,]+ "
                                                          r"tokens/s|\d: val loss [\d.]+, val ppl [\d.]+)", line)]
    assert out.count("/6: train loss") == 3 and out.count(": val loss") == 2
    tl.main(common + ["--out-dir", str(tmp_path / "b"), "--quiet"])
    out = capsys.readouterr().out
    assert "train loss" not in out and out.count(": val loss") == 2 and "adamw (lr 0.003) seed 0:" in out


# Progress output: a tqdm bar on a terminal, plain lines (no \r) anywhere else, as
# llama_c4.interactive() decides for the script and bench.py alike.

def run_in_terminal(cmd, timeout=180):
    """(exit status, output) of ``cmd`` with stdout and stderr on a pseudo-terminal 120
    columns wide, as in an interactive shell. (The terminal turns each \n into \r\n.)"""
    pytest.importorskip("termios")  # a Unix pseudo-terminal
    import fcntl
    import pty
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: the process and its children closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def four_steps(corpus, out_dir):
    return [sys.executable, "train_tiny_llama.py", *[a for a in SMALL if a != "--quiet"], "--max-steps", "4",
            "--eval-interval", "2", "--log-interval", "1", "--data", corpus, "--out-dir", str(out_dir)]


@pytest.mark.slow
def test_progress_on_a_terminal_is_a_bar_with_eta_and_evaluations_stay_lines(corpus, tmp_path):
    """Starts the script on a pseudo-terminal."""
    status, out = run_in_terminal(four_steps(corpus, tmp_path))
    assert status == 0, out[-3000:]
    assert "\rtrain: " in out and "step/s" in out and "loss=" in out and "tokens/s]" in out  # bar and postfix
    assert re.search(r" 4/4 \[\d\d:\d\d<\d\d:\d\d, ", out)  # tqdm's elapsed<ETA
    assert "train loss" not in out  # the bar replaces the train-loss lines...
    for step in (2, 4):  # ...evaluations stay whole lines, written above the bar
        assert re.search(rf"\rstep {step}: val loss [\d.]+, val ppl [\d.]+\r\n", out), out[-3000:]
    assert re.search(r"\]\r\nadamw \(lr 0\.003\) seed 0: ", out)  # the bar ended (closed) before the result


@pytest.mark.slow
def test_progress_piped_is_the_plain_lines_without_carriage_returns(corpus, tmp_path):
    """Starts the script with its output piped."""
    out = subprocess.run(four_steps(corpus, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "\r" not in out.stdout and "loss=" not in out.stdout
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    train, val = r": train loss [\d.]+, lr [\d.e-]+, [\d,]+ tokens/s", r": val loss [\d.]+, val ppl [\d.]+"
    expected = ["step 1/4" + train, "step 2/4" + train, "step 2" + val, "step 3/4" + train, "step 4/4" + train,
                "step 4" + val]  # piped: plain lines, no bar
    assert len(steps) == len(expected) and all(re.fullmatch(e, line) for e, line in zip(expected, steps)), steps


def interrupt_at_step(monkeypatch, step_index):
    """A Ctrl-C (KeyboardInterrupt) inside training step ``step_index`` (counted from 0)."""
    step = tl.train_step

    def interrupted(run, batches):
        if run.step == step_index:
            raise KeyboardInterrupt
        return step(run, batches)

    monkeypatch.setattr(tl, "train_step", interrupted)


def test_a_second_ctrl_c_on_a_terminal_ends_the_bar_before_its_message(corpus, tmp_path, monkeypatch, capsys):
    # a terminal simulated in this process: interactive() says so, and the bar goes to the captured stderr
    monkeypatch.setattr(llama_c4, "interactive", lambda: True)
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        tl.main([a for a in SMALL if a != "--quiet"] + ["--data", corpus, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "\rtrain: " in err and " 3/6 " in err
    assert "\nstopped at once: no checkpoint was saved" in err  # on a line of its own, not after the bar


@pytest.mark.slow
def test_bench_compare_piped_says_which_run_of_how_many_with_an_eta(corpus, tmp_path):
    """Starts bench.py compare with its output piped (stderr into stdout, to see the order)."""
    cmd = [sys.executable, "bench.py", "compare", *SMALL, "--optimizer", "adamw", "--lr-sweep", "0.5,1", "--seeds",
           "2", "--data", corpus, "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "\r" not in out.stdout
    runs = [line for line in out.stdout.splitlines() if line.startswith("run ")]
    eta = r" \(\d\d:\d\d elapsed, about \d\d:\d\d left\)"
    assert runs[0] == "run 1/4: adamw seed 0 lr 0.0015"
    for line, expected in zip(runs[1:], ["run 2/4: adamw seed 0 lr 0.003", "run 3/4: adamw seed 1 lr 0.0015",
                                         "run 4/4: adamw seed 1 lr 0.003"]):
        assert re.fullmatch(re.escape(expected) + eta, line), line
    assert len(runs) == 4
    # each run is announced before its result, after the one before
    order = [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith(("run ", "adamw (lr"))]
    assert order == ["run 1/4", "adamw (lr 0.0015) seed 0", "run 2/4", "adamw (lr 0.003) seed 0",
                     "run 3/4", "adamw (lr 0.0015) seed 1", "run 4/4", "adamw (lr 0.003) seed 1"]


@pytest.mark.slow
def test_bench_steps_shows_progress_while_it_builds_and_measures(xdg_cache):
    """Starts bench.py steps twice: on a pseudo-terminal, and piped."""
    cmd = [sys.executable, "bench.py", "steps", "--model", "tiny", "--optimizer", "adamw,galore", "--steps", "1"]
    status, out = run_in_terminal(cmd)
    assert status == 0 and "\rsteps: " in out and " 3/3 [" in out and "galore: 3 step() calls" in out, out[-3000:]
    piped = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert piped.returncode == 0 and "\r" not in piped.stdout + piped.stderr
    assert [line.split(" (")[0] for line in piped.stderr.splitlines()] == [
        "measurement 1/3: build the tiny model and its random gradients", "measurement 2/3: adamw: 3 step() calls",
        "measurement 3/3: galore: 3 step() calls"]
    assert "measurement" not in piped.stdout  # the table alone on stdout


def small_python_docs():
    """60 documents in place of the Python documentation: a corpus written in a moment."""
    for i in range(60):
        yield f"python://fake/{i}", f"document {i}: " + "some documentation text. " * 20


def test_the_first_run_says_it_writes_the_corpus_and_where_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(llama_c4, "python_docs", small_python_docs)
    common = SMALL + ["--cache-dir", str(tmp_path / "cache")]
    corpus_dir = tmp_path / "cache" / f"pydoc-c4-py{sys.version_info.major}{sys.version_info.minor}"
    tl.main(common + ["--out-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert err.count("writing the embedded corpus") == 1
    assert f"writing the embedded corpus to {corpus_dir} (" in err
    assert (corpus_dir / "DONE").read_text() == "60 documents\n"
    tl.main(common + ["--out-dir", str(tmp_path / "b")])
    assert "writing the embedded corpus" not in capsys.readouterr().err  # written once


def test_the_default_run_trains_the_tiny_llama_on_bytes_with_adamw_into_out(tmp_path, monkeypatch, capsys):
    """`python train_tiny_llama.py` without flags (the README's quick start): AdamW on the tiny LLaMA (0.24M
    parameters) for 300 steps, on the embedded corpus written into ~/.cache/lowrank_adam (without
    XDG_CACHE_HOME), in UTF-8 byte tokens, into out/. Run shrunk by flags that change none of these, on a
    60-document corpus."""
    monkeypatch.setattr(llama_c4, "python_docs", small_python_docs)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    defaults = tl.parse_args([])
    assert (defaults.optimizer, defaults.model, defaults.max_steps, defaults.data, defaults.tokenizer) == (
        "adamw", "tiny", 300, None, None)
    result = tl.main(["--max-steps", "2", "--eval-interval", "2", "--batch-size", "2", "--seq-len", "32",
                      "--val-batches", "1", "--shuffle-buffer", "8"])
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    corpus = tmp_path / "home" / ".cache" / "lowrank_adam" / f"pydoc-c4-py{sys.version_info[0]}{sys.version_info[1]}"
    assert (corpus / "DONE").exists() and f"data: {corpus} (4 train / 1 validation shards)" in out
    assert "tokenizer: bytes (vocab 257)" in out and "adamw (lr 0.003) seed 0: 0.24M params" in out
    assert result["optimizer"] == "adamw" and result["params"] == 242_240
    text = "naïve café ✓"  # the byte tokenizer: a token per UTF-8 byte, so a loss (and perplexity) per byte
    assert tl.load_tokenizer(defaults).encode(text) == list(text.encode("utf-8")) and len(text.encode()) == 16


def test_an_interrupted_corpus_write_leaves_no_partial_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_c4, "python_docs", small_python_docs)

    class InterruptedAtTheThirdShard:
        opened = 0

        @classmethod
        def open(cls, *args, **kwargs):
            cls.opened += 1
            if cls.opened == 3:
                raise KeyboardInterrupt  # Ctrl-C with two shards written
            return gzip.open(*args, **kwargs)

    monkeypatch.setattr(llama_c4, "gzip", InterruptedAtTheThirdShard)
    with pytest.raises(KeyboardInterrupt):
        llama_c4.build_embedded_corpus(tmp_path / "cache", announce=False)
    assert InterruptedAtTheThirdShard.opened == 3 and list((tmp_path / "cache").rglob("*")) == []
    monkeypatch.undo()
    monkeypatch.setattr(llama_c4, "python_docs", small_python_docs)
    corpus = llama_c4.build_embedded_corpus(tmp_path / "cache", announce=False)  # the next run writes it all
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [corpus.name]
    assert len(llama_c4.find_shards(str(corpus))[0]) == 4 and (corpus / "DONE").exists()


# The second embedded corpus (--corpus packages): the installed packages' READMEs, licences and
# metadata. Most of these tests read a folder of made-up distributions, written in a moment.

def fake_site(root, names, version="1.0"):
    """Installed distributions in ``root`` (dist-info folders with METADATA and RECORD), each with a
    long description, a LICENSE that all share, a README in its package, a NOTICE too short to keep, and
    a license.py (code, not prose); importing a package fails, so that a test sees one imported."""
    for name in names:
        info, package = root / f"{name}-{version}.dist-info", root / name
        info.mkdir(parents=True)
        package.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n"
                                       + f"{name} {version} does one thing well. " * 10)
        (info / "LICENSE").write_text("MIT License\n\n" + "Permission is hereby granted, free of charge. " * 8)
        (package / "README.md").write_text(f"# {name}\n\n" + f"How to use {name}: import it. " * 10)
        (package / "NOTICE").write_text(f"{name}: a short notice")
        (package / "license.py").write_text("# the licence, as code\n" + "LICENSE = 'MIT'\n" * 20)
        (package / "__init__.py").write_text("raise ImportError('a package was imported')\n")
        files = [f"{info.name}/{f}" for f in ("METADATA", "LICENSE", "RECORD")]
        files += [f"{name}/{f}" for f in ("README.md", "NOTICE", "license.py", "__init__.py")]
        (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    return root


def use_site(monkeypatch, *sites, installed=llama_c4.installed_distributions):  # (the function itself, unpatched)
    """The corpus reads the distributions of ``sites`` in place of this Python's."""
    monkeypatch.setattr(llama_c4, "installed_distributions", lambda: installed([str(s) for s in sites]))


def shard_lines(corpus):
    """Each shard's name and its decompressed lines."""
    return {f.name: gzip.open(f, "rt").read().splitlines() for f in sorted(Path(corpus).glob("*.json.gz"))}


def test_package_docs_are_each_packages_prose_once_in_name_order_and_nothing_is_imported(tmp_path, monkeypatch):
    site = fake_site(tmp_path / "site", ["beta", "alpha", "Gamma_pkg"])
    fake_site(tmp_path / "later", ["alpha"], version="2.0")  # further down the path: not the one import finds
    monkeypatch.syspath_prepend(str(site))  # importable, but nothing may import them
    dists = llama_c4.installed_distributions([str(site), str(tmp_path / "later")])
    assert [(name, d.version) for name, d in dists] == [("alpha", "1.0"), ("beta", "1.0"), ("gamma-pkg", "1.0")]
    docs = list(llama_c4.package_docs(dists))
    assert [url for url, _ in docs] == [  # the shared licence once; the short notice and license.py never
        "python://packages/alpha/METADATA", "python://packages/alpha/alpha-1.0.dist-info/LICENSE",
        "python://packages/alpha/alpha/README.md", "python://packages/beta/METADATA",
        "python://packages/beta/beta/README.md", "python://packages/gamma-pkg/METADATA",
        "python://packages/gamma-pkg/Gamma_pkg/README.md"]
    assert docs[0][1] == "alpha 1.0 does one thing well. " * 10  # the long description alone, no headers
    assert not {"alpha", "beta", "Gamma_pkg"} & set(sys.modules)


def test_the_packages_corpus_is_deterministic_without_duplicates_and_holds_out_every_20th_document(
        tmp_path, monkeypatch):
    use_site(monkeypatch, fake_site(tmp_path / "site", [f"pkg{i:02d}" for i in range(15)]))
    urls = [url for url, _ in llama_c4.package_docs()]
    assert len(urls) == 31  # 15 descriptions, 15 READMEs, one licence
    a = llama_c4.build_embedded_corpus(tmp_path / "a", announce=False, corpus="packages")
    b = llama_c4.build_embedded_corpus(tmp_path / "b", announce=False, corpus="packages")
    assert a.name == b.name and a.name.startswith("packages-c4-")
    assert shard_lines(a) == shard_lines(b) and len(shard_lines(a)) == 5  # the same shards, written twice
    train, val = llama_c4.find_shards(str(a))
    read = lambda files: [json.loads(line) for f in files for line in gzip.open(f, "rt")]
    assert [r["url"] for r in read(val)] == [urls[9], urls[29]]  # every 20th document
    assert sorted(r["url"] for r in read(train)) == sorted(set(urls) - {urls[9], urls[29]})
    texts = [r["text"] for r in read(train + val)]
    assert len(set(texts)) == len(texts) == int((a / "DONE").read_text().split()[0])


def test_the_packages_corpus_is_rebuilt_when_the_installed_packages_change(tmp_path, monkeypatch, capsys):
    site = fake_site(tmp_path / "site", [f"pkg{i:02d}" for i in range(12)])
    use_site(monkeypatch, site)
    first = llama_c4.build_embedded_corpus(tmp_path / "cache", corpus="packages")
    err = capsys.readouterr().err
    assert f"writing the embedded corpus to {first} (once: the installed packages' READMEs" in err
    assert "wrote the packages corpus: 25 documents, 0.01 MB of text (24 train documents" in err  # one line
    assert llama_c4.build_embedded_corpus(tmp_path / "cache", corpus="packages") == first  # the same packages
    assert capsys.readouterr().err == ""
    fake_site(site, ["pkg99"])  # one more installed
    second = llama_c4.build_embedded_corpus(tmp_path / "cache", announce=False, corpus="packages")
    fake_site(tmp_path / "upgraded", [f"pkg{i:02d}" for i in range(12)], version="1.1")
    use_site(monkeypatch, tmp_path / "upgraded")
    third = llama_c4.build_embedded_corpus(tmp_path / "cache", announce=False, corpus="packages")
    assert len({first, second, third}) == 3
    assert int((second / "DONE").read_text().split()[0]) == 27  # pkg99's description and README too
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(p.name for p in (first, second, third))


def test_the_corpus_flag_is_in_help_and_with_data_is_refused_before_anything_is_read(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        tl.main(["--help"])
    assert "--corpus {pydoc,packages}" in capsys.readouterr().out
    (tmp_path / "c4-train.json").write_text(json.dumps({"text": "a document"}) + "\n")
    assert tl.parse_args([]).corpus == "pydoc" and tl.parse_args(["--corpus", "packages"]).corpus == "packages"
    assert tl.parse_args(["--data", str(tmp_path)]).corpus is None
    for module, name in ((llama_c4, "build_embedded_corpus"), (llama_c4, "C4Data"), (tl, "load_tokenizer"),
                         (llama_c4, "installed_distributions"), (llama_c4, "package_docs")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("read data before checking the flags"))
    for corpus in ("packages", "pydoc"):
        with pytest.raises(SystemExit) as e:
            tl.main(["--data", str(tmp_path), "--corpus", corpus, "--out-dir", str(tmp_path / "out")])
        assert e.value.code == (f"error: --corpus {corpus} picks the embedded corpus, which --data replaces: give "
                                "one of them")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="session")
def packages_corpus(xdg_cache):
    """The packages corpus of this Python's installed packages, beside the Python-docs corpus."""
    return llama_c4.build_embedded_corpus(xdg_cache / "lowrank_adam", corpus="packages")


def test_a_tiny_run_trains_on_the_packages_corpus_and_its_resume_keeps_it(packages_corpus, xdg_cache, tmp_path,
                                                                          capsys):
    train, val = llama_c4.find_shards(str(packages_corpus))
    texts = [json.loads(line)["text"] for f in train + val for line in gzip.open(f, "rt")]
    assert len(val) == 1 and len(texts) >= 20 and len(set(texts)) == len(texts)  # this Python's packages, once each
    flags = SMALL + ["--corpus", "packages", "--cache-dir", str(xdg_cache / "lowrank_adam")]
    result = tl.main(flags + ["--out-dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert f"data: {packages_corpus} (4 train / 1 validation shards)" in out
    assert result["steps"] == 6 and math.isfinite(result["val_loss"])
    assert result["val_loss"] < math.log(257)  # below a uniform guess over the bytes
    with pytest.raises(SystemExit, match="--corpus packages .now pydoc."):  # another corpus is another run
        tl.main(["--resume", "--out-dir", str(tmp_path / "a"), "--corpus", "pydoc"])


def test_bench_tables_name_the_corpus_they_ran_on(packages_corpus, xdg_cache, tmp_path, capsys):
    cache = ["--cache-dir", str(xdg_cache / "lowrank_adam")]
    bench.main(["compare", *SMALL, "--max-steps", "3", "--corpus", "packages", *cache, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert ("\non the packages corpus (the installed packages' READMEs, licences and metadata), tokenizer bytes:\n"
            "| optimizer | lr |") in out
    bench.main(["sensitivity", "--model", "tiny", "--steps", "2", "--perturb-step", "1", "--batch-size", "2",
                "--seq-len", "16", "--only", "AdamW", "--corpus", "packages", *cache])
    assert "constant lr; the packages corpus (the installed packages'" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.slow
def test_first_ctrl_c_saves_a_checkpoint_and_resume_continues(corpus, tmp_path):
    """Runs the script as a process and sends it SIGINT once it has logged step 3."""
    cmd = [sys.executable, "train_tiny_llama.py", *SMALL, "--max-steps", "100000", "--log-interval", "1",
           "--data", corpus, "--out-dir", str(tmp_path)]
    cmd.remove("--quiet")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = int(re.search(r"interrupted at step (\d+) of 100000: checkpoint saved to .*ckpt.pt; continue with: "
                         rf"python train_tiny_llama.py --resume --out-dir {re.escape(str(tmp_path))}\n",
                         out).group(1))
    assert step >= 3 and "Ctrl-C: finishing this step" in err
    resumed = tl.main(["--resume", "--out-dir", str(tmp_path), "--stop-after", "2"])  # the settings: the checkpoint's
    assert resumed["steps"] == step + 2


@pytest.mark.slow
def test_resume_needs_only_the_out_dir_and_refuses_only_explicit_changes(corpus, tmp_path, capsys):
    common = SMALL + ["--data", corpus, "--out-dir", str(tmp_path), "--optimizer", "adaptive", "--rank", "4"]
    tl.main(common + ["--stop-after", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"other settings: --rank 4 \(now 8\)\. A resume"):
        tl.main(["--resume", "--out-dir", str(tmp_path), "--rank", "8"])  # explicit and different: refused
    done = tl.main(["--resume", "--out-dir", str(tmp_path), "--stop-after", "2", "--quiet"])
    assert "resumed from step 2 of 6" in capsys.readouterr().out
    assert done["steps"] == 4 and done["optimizer"].startswith("adaptive")
    uninterrupted = tl.main(common + ["--out-dir", str(tmp_path / "whole")])
    finished = tl.main(["--resume", "--out-dir", str(tmp_path), "--rank", "4"])  # explicit but equal: fine
    assert finished["val_loss"] == uninterrupted["val_loss"]


def test_a_second_ctrl_c_says_what_was_kept(corpus, tmp_path, monkeypatch, capsys):
    # the second Ctrl-C raises KeyboardInterrupt inside a step (simulated here at step 4,
    # after the checkpoint of step 2); a run without any checkpoint keeps nothing
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        tl.main(SMALL + ["--data", corpus, "--out-dir", str(tmp_path / "a"), "--save-interval", "2"])
    assert e.value.code == 130
    assert (f"stopped at once: {tmp_path / 'a' / 'ckpt.pt'} holds the last checkpoint saved (by --save-interval or "
            f"an earlier run); continue with: python train_tiny_llama.py --resume --out-dir {tmp_path / 'a'}"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        tl.main(SMALL + ["--data", corpus, "--out-dir", str(tmp_path / "b"), "--save-interval", "0"])
    assert "no checkpoint was saved, so nothing of this run was kept" in capsys.readouterr().err
    assert (tmp_path / "b" / "metrics.jsonl").exists()  # it trained 3 steps: their log stays


def test_help_is_grouped_with_examples_on_their_lines_and_one_default_per_flag(capsys):
    """--help: flags grouped, examples one per line, each default stated once."""
    with pytest.raises(SystemExit):
        tl.main(["--help"])
    text = capsys.readouterr().out
    assert "\n  python train_tiny_llama.py                          # tiny LLaMA, AdamW, embedded corpus: 25-45 s" in text
    assert "2 min" not in text and "benchmark" not in text.lower()
    for group in ("data", "model", "optimizer", "galore and adaptive", "ldadam", "adapprox", "schedule",
                  "output and checkpoints", "system"):
        assert f"\n{group}:\n" in text
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert len(entries) > 40
    for entry in entries:
        assert len(re.findall(r"default|unset", entry)) <= 1, entry
    assert "--residual, --no-residual" in text and "(default: 300)" in text
    assert "decoupled weight decay (default: 0.0)" in text and "(default: False)" not in text


def test_help_lists_every_flag_with_the_default_a_run_uses(monkeypatch, capsys):
    """The README: "--help lists every flag with its default". Each flag that takes a value states the
    value a run without it uses, "(default: ...)", or says what happens "unset"; a switch is off unless given."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        tl.main(["--help"])
    text = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    entries = {}  # the first option string of each entry -> its text, on one line
    for entry in re.split(r"\n  (?=-)", text)[1:]:
        entries[entry.split()[0].rstrip(",")] = " ".join(entry.split())
    run = tl.parse_args([])
    actions = [a for a in tl.build_parser()._actions if a.dest != "help"]
    assert set(entries) == {a.option_strings[0] for a in actions} and len(actions) > 40
    for a in actions:
        entry = entries[a.option_strings[0]]
        if a.default is None:  # (--residual, --no-residual too)
            assert "unset" in entry and "(default:" not in entry, entry
        elif a.default is False:  # a switch
            assert "(default:" not in entry and getattr(run, a.dest) is False, entry
        else:
            assert f"(default: {getattr(run, a.dest)})" in entry, entry


def test_every_optimizer_flag_names_an_argument_of_an_optimizer():
    """The optimizer flags reach the optimizers by name, so a renamed argument must fail here, not silently."""
    takes = set().union(*(inspect.signature(r.cls).parameters for r in tl.OPTIMIZERS.values()))
    groups = ("galore and adaptive", "ldadam", "adapprox")
    flags = [a.dest for g in tl.build_parser()._action_groups if g.title in groups for a in g._group_actions]
    assert len(flags) == 14 and set(flags) <= takes


FLAG_EFFECTS = [  # (flags, what the optimizer's last param group holds then; None = off)
    (["--optimizer", "galore", "--update-proj-gap", "7", "--scale", "0.5", "--norm-growth-limit", "0", "--residual"],
     dict(update_proj_gap=7, scale=0.5, norm_growth_limit=None, residual=True, rank=16)),
    (["--optimizer", "adaptive", "--rank-metric", "gap", "--no-residual", "--rank", "3", "--norm-growth-limit", "2"],
     dict(rank_metric="gap", residual=False, rank=3, norm_growth_limit=2.0)),
    (["--optimizer", "adaptive:conditioning+noresidual", "--rank-metric", "gap", "--residual"],  # the spec wins
     dict(rank_metric="conditioning", residual=False)),
    (["--optimizer", "ldadam", "--rho", "0.5", "--no-error-feedback", "--beta1", "0.8", "--beta2", "0.9"],
     dict(rho=0.5, error_feedback=False, betas=(0.8, 0.9))),
    (["--optimizer", "adapprox", "--k-max-frac", "0.5", "--err-tol", "0.2", "--rank-init", "2", "--clip-threshold",
      "0", "--cosine-guidance", "--beta2", "0.95", "--weight-decay", "0.1", "--lr", "1e-4"],
     dict(k_max_frac=0.5, err_tol=0.2, rank_init=2, clip_threshold=None, cosine_guidance=True, betas=(0.9, 0.95),
          weight_decay=0.1, lr=1e-4)),
    (["--optimizer", "adamw", "--beta1", "0.8", "--update-proj-gap", "7"], dict(betas=(0.8, 0.999), lr=3e-3)),
    (["--optimizer", "galore+randomized"], dict(refresh="randomized", subspace="svd")),
    (["--optimizer", "adaptive:gap+randomized"], dict(refresh="randomized", rank_metric="gap")),
    (["--optimizer", "galore+randomized+stagger"], dict(refresh="randomized", stagger=True)),
]


@pytest.mark.parametrize("name", tl.staggered())
def test_stagger_reaches_the_optimizer_of_a_run_and_is_refused_where_no_class_takes_it(name, corpus, tmp_path):
    """--stagger (or the spec NAME+stagger) for the optimizers whose class takes ``stagger``:
    galore, and adaptive where AdaptiveAdamW takes it; off by default. The others refuse it up front
    (BAD_FLAGS), adaptive too where AdaptiveAdamW does not take it."""
    assert "galore" in tl.staggered() and "adamw" not in tl.staggered()
    if "stagger" not in inspect.signature(la.AdaptiveAdamW).parameters:
        with pytest.raises(SystemExit, match="--stagger: adaptive has no staggered refresh schedule"):
            tl.parse_args(["--optimizer", "adaptive", "--stagger"])
        with pytest.raises(SystemExit, match="adaptive has no variant \\+stagger"):
            tl.parse_args(["--optimizer", "adaptive+stagger"])
    build = lambda *flags: tl.build_optimizer(a := tl.parse_args(["--optimizer", *flags]),
                                              tl.build_model(a, vocab_size=64, device="meta"))
    assert build(name).param_groups[-1]["stagger"] is False  # the papers' schedule
    assert build(f"{name}+stagger").param_groups[-1]["stagger"] is True
    tl.main(SMALL + ["--data", corpus, "--out-dir", str(tmp_path), "--optimizer", name, "--stagger",
                     "--max-steps", "3", "--update-proj-gap", "2"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["settings"]["stagger"] is True
    assert all(g["stagger"] for g in ckpt["optimizer"]["param_groups"] if g.get("rank") is not None)
    help_text = " ".join(tl.build_parser().format_help().split())
    assert f"--stagger spread the subspace refreshes over the gap T ({', '.join(tl.staggered())};" in help_text
    assert "off by default: every matrix refreshes at steps 1, T+1, 2T+1, ..., the papers' schedule" in help_text


@pytest.mark.parametrize("argv, expected", FLAG_EFFECTS, ids=[a[1] for a, _ in FLAG_EFFECTS])
def test_flags_reach_the_optimizer(argv, expected):
    args = tl.parse_args(argv + ["--seed", "3"])
    opt = tl.build_optimizer(args, tl.build_model(args, vocab_size=64, device="meta"))
    group = opt.param_groups[-1]
    assert {k: group[k] for k in expected} == expected
    if isinstance(opt, la.LDAdam):
        assert opt.error_dtype is None  # the step's precision: float32 here
        args.error_dtype = "bf16"
        assert tl.build_optimizer(args, tl.build_model(args, 64, device="meta")).error_dtype == torch.bfloat16
    if isinstance(opt, (la.Adapprox, la.GaLoreAdamW)) and not isinstance(opt, la.AdaptiveAdamW):
        assert group["seed"] == 3  # seeds Adapprox's sketches and GaLore's random subspaces


def test_the_readme_spec_builds_the_optimizer_its_flags_build():
    """The README's `--optimizer adaptive:gap+residual` "(or: --rank-metric gap --residual)"."""
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert "--optimizer adaptive:gap+residual" in readme and "(or: --rank-metric gap --residual)" in readme

    def groups(*argv):
        args = tl.parse_args(list(argv))
        opt = tl.build_optimizer(args, tl.build_model(args, vocab_size=64, device="meta"))
        return type(opt), [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    spec = groups("--optimizer", "adaptive:gap+residual")
    assert spec == groups("--optimizer", "adaptive", "--rank-metric", "gap", "--residual")
    assert spec[0] is la.AdaptiveAdamW and spec[1][-1]["rank_metric"] == "gap" and spec[1][-1]["residual"] is True
    assert spec != groups("--optimizer", "adaptive")  # (the metric differs from the default's)


def test_rank_caps_the_rank_of_every_adapprox_matrix_unless_k_max_frac_is_given(corpus, tmp_path):
    """--rank reaches Adapprox as a group rank, the largest rank of every matrix it factors (the same matrices,
    in the same order, as without --rank); --k-max-frac, Adapprox's own flag, wins over it."""
    def largest_ranks(*flags):  # before the first step, ranks() gives each factored matrix's k_max
        args = tl.parse_args(["--optimizer", "adapprox", *flags])
        opt = tl.build_optimizer(args, tl.build_model(args, vocab_size=64, device="meta"))
        return opt.ranks()
    default = largest_ranks()
    assert len(default) == 4 * 7 + 2 and set(default) == {16}  # attn/mlp, embedding and LM head: a quarter of 64
    assert largest_ranks("--rank", "8") == [8] * len(default)
    assert largest_ranks("--rank", "8", "--k-max-frac", "0.5") == [32] * len(default)
    help_text = " ".join(tl.build_parser().format_help().split())
    assert ("adapprox: the cap of every matrix's adaptive rank, unless --k-max-frac is given); unset: hidden/4 "
            "(adapprox: --k-max-frac's cap)") in help_text
    result = tl.main(SMALL + ["--data", corpus, "--out-dir", str(tmp_path), "--optimizer", "adapprox", "--rank", "4",
                              "--max-steps", "3"])
    assert len(result["ranks"]) == len(default) and max(result["ranks"].values()) <= 4


def test_a_new_optimizer_is_one_recipe(corpus, tmp_path, monkeypatch):
    """How Adafactor or a GaLore subspace variant will join: one entry, its options from the flags by name."""
    monkeypatch.setitem(tl.OPTIMIZERS, "sgd", tl.Recipe(torch.optim.SGD, 0.05, variants={
        "+nesterov": {"momentum": 0.9, "nesterov": True}}))
    result = tl.main(SMALL + ["--data", corpus, "--out-dir", str(tmp_path), "--optimizer", "sgd+nesterov"])
    assert result["optimizer"] == "sgd+nesterov" and result["lr"] == 0.05 and result["state_mb"] > 0
    assert tl.parse_optimizer("adaptive:gap+noresidual") == ("adaptive", {"rank_metric": "gap", "residual": False})


def test_the_two_corpus_variants_set_the_options_the_results_name():
    # the specs of docs/RESULTS.md's two-corpus checks, built into the optimizers they describe
    model = tl.build_model(tl.parse_args(["--model", "tiny"]), 257)
    for spec, cls, option, value in [("ldadam+std", la.LDAdam, "proj_type", "std"),
                                     ("galore:gha+residual+gha_lr0.1", la.GaLoreAdamW, "gha_lr", 0.1),
                                     ("galore:gha+gha_lr1", la.GaLoreAdamW, "gha_lr", 1.0),
                                     ("adapprox:clamp", la.Adapprox, "nonneg", "clamp"),
                                     ("adapprox:floor", la.Adapprox, "nonneg", "floor"),
                                     ("adapprox+noscaling", la.Adapprox, "row_col_scaling", False)]:
        opt = tl.build_optimizer(tl.parse_args(["--optimizer", spec, "--rank", "4"]), model)
        assert isinstance(opt, cls) and all(g[option] == value for g in opt.param_groups), spec
    assert all(g["proj_type"] == "ldadam" for g in tl.build_optimizer(
        tl.parse_args(["--optimizer", "ldadam", "--rank", "4"]), model).param_groups)  # the official rule by default


def test_small_models_on_cpu_default_to_one_thread():
    """conftest.py pins the suite itself to 1 thread."""
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    try:
        for model, threads, expect in [("tiny", 0, 1), ("9m", 0, 2), ("tiny", 2, 2), ("60m", 0, 2), ("9m", 1, 1)]:
            torch.set_num_threads(2)
            llama_c4.set_threads(tl.parse_args(["--model", model, "--threads", str(threads)]), "cpu")
            assert torch.get_num_threads() == expect
    finally:
        torch.set_num_threads(1)


def test_the_suite_runs_on_at_most_four_processes(monkeypatch):
    """conftest.py: ``-n auto`` starts one test process per core this process may use, at most 4."""
    import conftest
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's; the process may use fewer
    for cores, workers in [(1, 1), (2, 2), (3, 3), (4, 4), (16, 4)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        assert conftest.pytest_xdist_auto_num_workers(None) == workers
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # where the OS has no affinity
    for cores, workers in [(2, 2), (16, 4), (None, 1)]:
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert conftest.pytest_xdist_auto_num_workers(None) == workers


def test_tests_sharing_a_fixture_that_starts_processes_run_in_one_process_and_slow_tests_first(request):
    """conftest.py, seen in this session's own collection: each test using one of SHARED_FIXTURES
    (module fixtures that run torchrun once) carries its xdist_group, and the slow tests come first."""
    import conftest
    source = open(os.path.join(ROOT, "test_lowrank_adam.py")).read()
    for name in conftest.SHARED_FIXTURES:  # each still a module fixture of the optimizer tests
        assert re.search(rf'@pytest.fixture\(scope="module"\)\ndef {name}\(', source), name

    class Item:  # what the hook reads and writes of a pytest item
        def __init__(self, fixtures, slow):
            self.fixturenames, self.marks = fixtures, [pytest.mark.slow.mark] if slow else []

        def get_closest_marker(self, name):
            return next((m for m in self.marks if m.name == name), None)

        def add_marker(self, mark):
            self.marks.append(mark.mark)

    fsdp, copied = conftest.SHARED_FIXTURES[0], conftest.SHARED_FIXTURES[-1]
    items = [Item(["tmp_path"], False), Item([fsdp], False), Item(["tmp_path"], True), Item([fsdp], True),
             Item([copied, "tmp_path"], False)]
    order = list(items)
    conftest.pytest_collection_modifyitems(None, items)
    assert items == [order[2], order[3], order[0], order[1], order[4]]  # slow first, else as collected
    groups = [[m.args[0] for m in item.marks if m.name == "xdist_group"] for item in order]
    assert groups == [[], [fsdp], [], [fsdp], [copied]]
    # and in this session's own collection
    for item in request.session.items:
        shared = [name for name in conftest.SHARED_FIXTURES if name in item.fixturenames]
        assert [m.args[0] for m in item.iter_markers("xdist_group")] == shared[:1]
    slow = [item.get_closest_marker("slow") is not None for item in request.session.items]
    assert slow == sorted(slow, reverse=True)


@pytest.mark.slow
def test_requirements_list_numpy_so_torch_imports_without_a_warning():
    """Starts two processes: without numpy torch warns (so the check can fail), with it not."""
    names = [re.split(r"[<>=!~ ]", line)[0] for line in open(os.path.join(ROOT, "requirements.txt"))
             if line.strip() and not line.startswith("#")]
    assert "numpy" in names and "torch" in names
    hidden = subprocess.run([sys.executable, "-c", "import sys; sys.modules['numpy'] = None; import torch"],
                            capture_output=True, text=True)
    assert "Failed to initialize NumPy" in hidden.stderr
    plain = subprocess.run([sys.executable, "-W", "always", "-c", "import torch, train_tiny_llama"],
                           capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 0 and plain.stderr == ""


def test_requirements_state_a_torch_range_and_ci_installs_the_tested_version():
    # installing the project must not replace a user's torch; CI stays reproducible through constraints.txt
    lines = [line.strip() for line in open(os.path.join(ROOT, "requirements.txt"))
             if line.strip() and not line.startswith("#")]
    torch_req = next(line for line in lines if re.split(r"[<>=!~ ]", line)[0] == "torch")
    assert torch_req.startswith("torch>=") and "==" not in torch_req
    minimum = torch_req.split(">=")[1]
    pins = [line.strip() for line in open(os.path.join(ROOT, "constraints.txt")) if line.startswith("torch==")]
    assert pins == ["torch==2.13.0"]
    assert "-r requirements.txt -c constraints.txt" in open(os.path.join(ROOT, ".ci", "run")).read()
    assert f"torch >= {minimum}" in open(os.path.join(ROOT, "lowrank_adam.py")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"torch {minimum} or newer" in readme and "CPU-only" in readme


def test_the_readme_names_what_requirements_txt_installs_and_ci_runs_its_test_command():
    """README, Install: `pip install -r requirements.txt` "brings the rest (...)", the packages besides torch;
    `-c constraints.txt` pins the ones it names. Quick start: `python -m pytest -q -n auto --dist loadgroup`
    runs the suite, as CI runs it."""
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    names = lambda path: {re.split(r"[<>=!~ ]", line.strip())[0] for line in open(os.path.join(ROOT, path))
                          if line.strip() and not line.startswith("#")}
    brings = re.search(r"`pip install -r requirements.txt` brings the rest \(([^)]*)\)", readme)[1]
    assert set(re.findall(r"[\w-]+", brings)) - {"and", "for", "the", "tests"} == names("requirements.txt") - {"torch"}
    pinned = re.search(r"add `-c constraints.txt` for the exact (.*?) the tests run with", readme)[1]
    assert set(re.findall(r"\w+", pinned)) - {"and"} == names("constraints.txt") <= names("requirements.txt")
    assert "python -m pytest -q -n auto --dist loadgroup" in readme_commands()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert re.search(r"^python -m pytest -q -n auto --dist loadgroup$", ci, re.M)


@pytest.mark.slow
def test_compare_tabulates_and_a_resumed_compare_reports_finished_runs(corpus, tmp_path, capsys):
    args = ["compare", *SMALL, "--data", corpus, "--out-dir", str(tmp_path), "--optimizer", "adamw,galore",
            "--seeds", "2"]
    results = bench.main(args)
    assert [(r["optimizer"], r["seed"]) for r in results] == [("adamw", 0), ("galore", 0), ("adamw", 1),
                                                               ("galore", 1)]
    out = capsys.readouterr().out
    assert "| adamw | 0.003 | 2 |" in out and "| galore |" in out and "% of AdamW" in out
    assert json.load(open(tmp_path / "results.json"))[0]["optimizer"] == "adamw"
    again = bench.main(args + ["--resume"])  # a finished run must not report "0 tokens/s, step() nan ms"
    assert again == results and capsys.readouterr().out.count("(complete before: the saved result)") == 4


def test_compare_of_a_single_run_prints_its_table(corpus, tmp_path, capsys):
    bench.main(["compare", *SMALL, "--max-steps", "3", "--data", corpus, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| optimizer | lr | seeds | val loss |" in out and "\n| adamw | 0.003 | 1 | " in out


def test_compare_goes_on_past_a_diverged_run_and_names_it_below_its_table(corpus, tmp_path, capsys):
    """An lr sweep whose largest lr diverges still tabulates the others (no traceback, no NaN row)."""
    results = bench.main(["compare", *SMALL, "--max-steps", "3", "--data", corpus, "--out-dir", str(tmp_path),
                          "--lr-sweep", "1,1e11"])
    assert [r["lr"] for r in results] == [3e-3]
    out = capsys.readouterr().out
    assert "adamw seed 0 lr 3e+08: diverged at step 2 of 3 (a non-finite loss or gradient)" in out  # as it happens
    row, below = out.split("\n| adamw | 0.003 | 1 | ")[1].split("\n", 1)
    assert "nan" not in out and below == "diverged, so not in the table: adamw seed 0 lr 3e+08 at step 2\n"
    assert (tmp_path / "adamw-lr3e+08-seed0" / "metrics.diverged.jsonl").exists()


def test_compare_lr_sweep_names_runs_and_keeps_each_best_lr(corpus, tmp_path, capsys):
    bench.main(["compare", *SMALL, "--data", corpus, "--out-dir", str(tmp_path), "--optimizer", "adamw",
                "--lr-sweep", "0.5,1"])
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"adamw-lr0.0015-seed0", "adamw-seed0"}
    assert "each optimizer at its best lr" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_widen_moves_past_an_edge_best_lr_until_the_best_is_inside(corpus, tmp_path, capsys):
    # lrs far too small: the largest tried is the best, so --widen tries one sweep step (10x) above
    # it, once per --widen; a best lr inside the sweep (one below, one diverging above) is left alone
    results = bench.main(["compare", *SMALL, "--max-steps", "3", "--data", corpus, "--out-dir", str(tmp_path / "a"),
                          "--lr-sweep", "1e-6,1e-5", "--widen", "2", "--seeds", "2"])
    assert sorted({r["lr"] for r in results}) == pytest.approx([3e-9, 3e-8, 3e-7, 3e-6])
    assert len(results) == 8 and "widen: adamw's best lr 3e-08 is the largest tried; trying 3e-07" in \
        capsys.readouterr().out
    results = bench.main(["compare", *SMALL, "--max-steps", "3", "--data", corpus, "--out-dir", str(tmp_path / "b"),
                          "--lr-sweep", "1e-6,1,1e11", "--widen", "2"])
    assert sorted(r["lr"] for r in results) == pytest.approx([3e-9, 3e-3])  # 3e+08 diverged: no widening
    assert "widen:" not in capsys.readouterr().out
    results = bench.main(["compare", *SMALL, "--max-steps", "3", "--data", corpus, "--out-dir", str(tmp_path / "c"),
                          "--lr-sweep", "100,1000", "--widen", "1"])  # far too large: widened downwards
    assert "widen: adamw's best lr 0.3 is the smallest tried; trying 0.03" in capsys.readouterr().out
    assert 0.03 == pytest.approx(min(r["lr"] for r in results))


def fake_training(monkeypatch, loss_of):
    """Replace compare's training run by ``loss_of(args)``: a val loss, or None for a run that diverges.
    Returns the list of (optimizer, lr, seed) of every run compare started, in order."""
    started = []

    def train(args, data, val, dist, ckpt=None):
        started.append((args.optimizer, args.lr, args.seed))
        loss = loss_of(args)
        if loss is None:
            raise tl.Diverged(2)
        return {"optimizer": args.optimizer, "lr": args.lr, "seed": args.seed, "params": 1e6, "steps": 3,
                "val_loss": loss, "val_ppl": math.exp(loss), "tokens_per_s": 1.0, "state_mb": 1.0, "step_ms": 1.0,
                "seconds": 0.0, "peak_cuda_gb": None}

    monkeypatch.setattr(tl, "train", train)
    return started


def test_compare_widen_steps_by_the_sweeps_geometric_ratio_and_counts_each_spec_on_its_own(corpus, tmp_path,
                                                                                          capsys, monkeypatch):
    # a loss that falls towards a spec's own optimum far outside the sweep: adamw's best lies above, galore's
    # below, so each spec moves its own edge --widen times, by the sweep's mean ratio (10 for 0.01,0.1,1)
    target = {"adamw": 1.0, "galore": 1e-9}
    started = fake_training(monkeypatch, lambda a: 1 + abs(math.log10(a.lr / target[a.optimizer])))
    bench.main(["compare", *SMALL, "--data", corpus, "--out-dir", str(tmp_path / "a"), "--optimizer", "adamw,galore",
                "--lr-sweep", "0.01,0.1,1", "--widen", "2"])
    lrs = lambda spec: sorted(lr for name, lr, _ in started if name == spec)
    base = {spec: tl.OPTIMIZERS[spec].lr for spec in target}
    assert lrs("adamw") == pytest.approx([base["adamw"] * f for f in (0.01, 0.1, 1, 10, 100)])
    assert lrs("galore") == pytest.approx([base["galore"] * f for f in (1e-4, 1e-3, 0.01, 0.1, 1)])
    out = capsys.readouterr().out
    assert out.count("widen: adamw's best lr") == 2 and out.count("widen: galore's best lr") == 2
    # a single factor: the one lr is the largest tried (and the smallest), so the step is 2, upwards
    started.clear()
    bench.main(["compare", *SMALL, "--data", corpus, "--out-dir", str(tmp_path / "b"), "--lr-sweep", "1",
                "--widen", "1"])
    assert lrs("adamw") == pytest.approx([base["adamw"], 2 * base["adamw"]])
    assert f"widen: adamw's best lr {base['adamw']:g} is the largest tried; trying {2 * base['adamw']:g}" in \
        capsys.readouterr().out


def test_compare_widen_ranks_lrs_by_the_median_over_seeds_a_diverged_run_an_infinite_loss(corpus, tmp_path,
                                                                                           capsys, monkeypatch):
    # per spec, lrs x1 and x10 over 3 seeds (the loss of seed 0, 1, 2):
    #   adamw:    x1 (2, 2, 2),       x10 (1, 1, diverged): median picks x10 (a mean, inf, would pick x1)
    #   galore:   x1 (1.5, 1.5, 1.5), x10 (1, 3, 3): median picks x1 (the least single loss is x10's)
    #   adaptive: every run diverges: nothing to widen from
    def loss_of(a):
        if a.optimizer == "adaptive":
            return None
        high = a.lr > 1.5 * tl.OPTIMIZERS[a.optimizer].lr
        if a.optimizer == "adamw":
            return (None if a.seed == 2 else 1.0) if high else 2.0
        return (1.0 if a.seed == 0 else 3.0) if high else 1.5

    started = fake_training(monkeypatch, loss_of)
    bench.main(["compare", *SMALL, "--data", corpus, "--out-dir", str(tmp_path), "--optimizer",
                "adamw,galore,adaptive", "--lr-sweep", "1,10", "--seeds", "3", "--widen", "1"])
    base = {spec: tl.OPTIMIZERS[spec].lr for spec in ("adamw", "galore", "adaptive")}
    out = capsys.readouterr().out
    assert f"widen: adamw's best lr {10 * base['adamw']:g} is the largest tried; " \
           f"trying {100 * base['adamw']:g}" in out
    assert f"widen: galore's best lr {base['galore']:g} is the smallest tried; " \
           f"trying {0.1 * base['galore']:g}" in out
    assert "widen: adaptive" not in out and sum(name == "adaptive" for name, _, _ in started) == 6
    assert len(started) == 3 * 2 * 3 + 2 * 3  # the sweep, then one more lr of adamw and of galore


@pytest.mark.slow
def test_compare_starts_every_spec_and_lr_of_a_seed_from_the_same_weights_and_data_order(corpus, tmp_path):
    """Runs of one seed, whatever their optimizer and lr, compute the same loss at step 1 (the same initial
    weights on the same first batch) and stand at the same data position at the end; another seed differs."""
    bench.main(["compare", *SMALL, "--max-steps", "3", "--log-interval", "1", "--data", corpus, "--out-dir",
                str(tmp_path), "--optimizer", "adamw,galore", "--lr-sweep", "0.5,1", "--seeds", "2"])
    runs = {}  # seed -> [(step-1 loss, data position at the end)] of its runs
    for folder in sorted(p.parent for p in tmp_path.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        data = torch.load(folder / "ckpt.pt", weights_only=True)["data"]  # the stream, shuffle buffer and rng
        position = repr({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in
                         {**data["stream"], "buffer": data["buffer"], "rng": data["rng"]}.items()})
        runs.setdefault(rows[0]["seed"], []).append((rows[1]["train_loss"], position))
    assert sorted(runs) == [0, 1] and [len(r) for r in runs.values()] == [4, 4]  # 2 optimizers x 2 lrs
    for seed, found in runs.items():
        assert all(run == found[0] for run in found), seed
    assert runs[0][0][0] != runs[1][0][0] and runs[0][0][1] != runs[1][0][1]


def test_bench_help_explains_every_subcommand(capsys):
    """`python bench.py --help` explains each subcommand bench.py takes (but the -one helpers it starts in
    processes of their own), and each subcommand's --help lists its flags."""
    bench.main(["--help"])
    text = capsys.readouterr().out
    section = text.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0]
    explained = re.findall(r"^  ([\w-]+) +\w", section, re.M)
    with pytest.raises(SystemExit) as e:
        bench.main(["no-such-command"])
    taken = re.search(r"choose from (.*?) \(see python bench.py --help\)", str(e.value.code))[1].split(", ")
    assert sorted(explained) == sorted(c for c in taken if not c.endswith("-one")) and len(explained) == 13
    for command in explained:
        with pytest.raises(SystemExit) as e:
            bench.main([command, "--help"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: bench.py {command} "), command


def torchrun(*flags, cwd=ROOT, nproc=2):
    """train_tiny_llama.py under torchrun with ``nproc`` gloo processes: its stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "train_tiny_llama.py", *SMALL, "--threads", "1", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def final_weights(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_torchrun_two_process_cpu_smoke(corpus, tmp_path):
    """Starts torchrun with 2 gloo processes."""
    stdout = torchrun("--data", corpus, "--optimizer", "ldadam", "--out-dir", str(tmp_path))
    assert stdout.count("ldadam (lr 0.003) seed 0:") == 1  # only rank 0 reports
    assert "replicas: the weights are identical on all 2 ranks" in stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["settings"]["processes"] == 2


@pytest.mark.slow
def test_torchrun_zero_adapprox_replicas_stay_identical_and_resume_exactly(corpus, tmp_path):
    # ZeRO-1: each rank steps and keeps the state of its shard of the parameters and
    # broadcasts them; the checkpoint holds the consolidated state and every rank's
    # data position, so an interrupted run continues exactly as the uninterrupted one.
    common = ("--data", corpus, "--optimizer", "adapprox", "--zero")
    whole = torchrun(*common, "--out-dir", str(tmp_path / "whole"))
    part = torchrun(*common, "--out-dir", str(tmp_path / "part"), "--stop-after", "3")
    resumed = torchrun(*common, "--out-dir", str(tmp_path / "part"), "--resume")
    for stdout in (whole, part, resumed):
        assert "replicas: the weights are identical on all 2 ranks" in stdout
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["data"]) == 2  # a position per rank


@pytest.mark.slow
def test_torchrun_zero_galore_equals_plain_ddp_and_each_rank_keeps_its_shard_of_the_state(corpus, tmp_path):
    # GaLore's update of a matrix depends on nothing random: a rank stepping its shard
    # computes exactly what every rank computes without ZeRO; and under ZeRO each rank
    # holds the state of its shard of the parameters only (DDP: all of it on every rank)
    common = ("--data", corpus, "--optimizer", "galore", "--update-proj-gap", "4")
    torchrun(*common, "--out-dir", str(tmp_path / "ddp"))
    torchrun(*common, "--zero", "--out-dir", str(tmp_path / "zero"))
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "zero")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ddp, zero = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["result"]["state_bytes_per_rank"]
                 for d in ("ddp", "zero"))
    assert ddp[0] == ddp[1] and sum(zero) == ddp[0] and 0 < min(zero) <= max(zero) < ddp[0]


def test_under_torchrun_each_process_takes_a_gpu_with_nccl_or_a_cpu_share_with_gloo(monkeypatch):
    """The README: on GPUs the same torchrun command runs one process per GPU, with NCCL instead of gloo.
    (torch.distributed and CUDA stood in for: the backend and device each process would take.)"""
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    for gpus, flags, expected, device in [(True, [], ["nccl", "cuda:1"], "cuda:1"), (False, [], ["gloo"], "cpu"),
                                          (True, ["--device", "cpu"], ["gloo"], "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus)
        calls.clear()
        dist = llama_c4.setup_distributed(tl.parse_args(["--threads", "1", *flags]))
        assert calls == expected and dist == llama_c4.Dist(True, 1, 2, device)


@pytest.mark.slow
def test_torchrun_fsdp_galore_equals_plain_ddp_and_reports_each_ranks_state(corpus, tmp_path):
    # FSDP2: each matrix stepped whole on its owner rank, the same code on the same whole
    # tensors, so the run is plain DDP's; the gradients are reduce-scattered instead of
    # all-reduced, which sums them in the same order on 2 ranks. (--grad-clip 0: the norm of
    # sharded gradients is summed shard by shard, a rounding apart, which GaLore's SVDs amplify.)
    common = ("--data", corpus, "--optimizer", "galore", "--update-proj-gap", "4", "--grad-clip", "0")
    ddp = torchrun(*common, "--out-dir", str(tmp_path / "ddp"))
    fsdp = torchrun(*common, "--fsdp", "--out-dir", str(tmp_path / "fsdp"))
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # measured: bit for bit
    val = [torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["result"] for d in ("ddp", "fsdp")]
    assert val[0]["val_loss"] == val[1]["val_loss"]
    ddp_bytes, fsdp_bytes = val[0]["state_bytes_per_rank"], val[1]["state_bytes_per_rank"]
    assert ddp_bytes[0] == ddp_bytes[1] and sum(fsdp_bytes) == ddp_bytes[0] and max(fsdp_bytes) < ddp_bytes[0]
    assert f"state bytes per rank {fsdp_bytes[0]:,} / {fsdp_bytes[1]:,}" in fsdp
    assert "replicas" in ddp and "replicas" not in fsdp  # sharded: no replicas to compare


def test_fsdp_shards_each_block_the_embedding_and_the_head_as_units_of_their_own():
    # shard_model: the vocabulary matrices are not in the root unit, which would gather them whole
    # for the whole forward and backward; one gloo process is enough to see the units
    from torch.distributed.fsdp import FSDPModule
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = llama_c4.Llama(llama_c4.LlamaConfig(vocab_size=64, hidden=16, intermediate=32, heads=2, layers=2))
        llama_c4.shard_model(model)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert set(map(id, units)) == {id(model), id(model.embed_tokens), id(model.lm_head), *map(id, model.layers)}
        root_params = {id(p) for p in model.parameters()} - {id(p) for u in units if u is not model
                                                               for p in u.parameters()}
        assert root_params == {id(model.norm.weight)}  # the root keeps the final norm alone
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("opt", ["adaptive", "adapprox", "adamw"])
@pytest.mark.slow
def test_torchrun_fsdp_interrupted_and_resumed_equals_the_uninterrupted_run(opt, corpus, tmp_path):
    # the checkpoint is one process's (a single ckpt.pt from rank 0, by parameter name): the dense
    # state gathered from its shards, each matrix's low-rank state from its owner rank
    common = ("--data", corpus, "--optimizer", opt, "--fsdp")
    torchrun(*common, "--out-dir", str(tmp_path / "whole"))
    torchrun(*common, "--out-dir", str(tmp_path / "part"), "--stop-after", "3")
    assert "resumed from step 3 of 6" in torchrun(*common, "--out-dir", str(tmp_path / "part"), "--resume")
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)
    assert ckpt["result"]["val_loss"] == torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)["result"][
        "val_loss"]
    assert set(ckpt["model"]) == set(tl.build_model(tl.parse_args([]), 257).state_dict())  # plain tensors
    assert all(not hasattr(v, "to_local") for v in ckpt["model"].values())
    if opt == "adaptive":  # every matrix's state in the file, its owner's, in place of the markers
        matrices = [n for g in ckpt["optimizer"]["param_groups"] if g.get("rank") is not None for n in g["params"]]
        assert len(matrices) > 2 and all("owner" not in ckpt["optimizer"]["state"][n] and "exp_avg" in
                                         ckpt["optimizer"]["state"][n] for n in matrices)


@pytest.mark.slow
def test_torchrun_fsdp_resumes_on_another_number_of_processes_and_says_so(corpus, tmp_path):
    # 2 processes stop at step 3; the run goes on on 1 process, then (a second run) back on 2. The
    # checkpoint holds every matrix's state whole, so each run's ranks take their owners' share, and every
    # state counts on from step 3; the data goes on from the furthest rank's position.
    common = ("--data", corpus, "--optimizer", "adaptive", "--fsdp")
    torchrun(*common, "--out-dir", str(tmp_path / "a"), "--stop-after", "3")
    one = torchrun(*common, "--out-dir", str(tmp_path / "a"), "--resume", nproc=1)
    assert "resumed from step 3 of 6" in one and "--fsdp: resumed on 1 processes, the checkpoint's run had 2" in one
    torchrun(*common, "--out-dir", str(tmp_path / "b"), "--stop-after", "3", nproc=1)
    two = torchrun(*common, "--out-dir", str(tmp_path / "b"), "--resume")
    assert "--fsdp: resumed on 2 processes, the checkpoint's run had 1" in two and "tokens per step go from" in two
    for d in ("a", "b"):  # every state went on from step 3 (a restarted one would count 3), whole in the file
        ckpt = torch.load(tmp_path / d / "ckpt.pt", weights_only=True)
        assert ckpt["step"] == 6 and ckpt["result"] is not None
        state = ckpt["optimizer"]["state"]
        assert all("owner" not in s and int(s["step"]) == 6 for s in state.values()), d
        assert sum("P" in s for s in state.values()) > 2


@pytest.mark.parametrize("fsdp", [False, True])
def test_only_an_fsdp_run_may_resume_on_another_number_of_processes(fsdp, tmp_path, monkeypatch):
    # DDP's and ZeRO's data positions and --zero's shards are per rank: a changed count is refused there
    args = tl.parse_args(["--out-dir", str(tmp_path), "--resume"])
    args.fsdp = fsdp  # (as parsed under torchrun)
    saved = {"settings": {**llama_c4.run_settings(args), "processes": 2}}
    monkeypatch.setenv("WORLD_SIZE", "1")
    if fsdp:
        llama_c4.check_resume(args, saved)
    else:
        with pytest.raises(SystemExit, match=r"processes 2 \(now 1\)"):
            llama_c4.check_resume(args, saved)


def test_a_changed_number_of_ranks_goes_on_from_the_furthest_data_position():
    # the same number of ranks: each its own position; another: the furthest stream position, nothing
    # carried over, the shuffle state of rank r mod N
    def state(line, rng):
        return {"stream": {"epoch": 0, "file": 0, "line": line, "doc": line, "used": line, "emitted": 1,
                           "tokens": torch.arange(3)}, "buffer": torch.ones(2, 4, dtype=torch.long), "rng": rng}
    saved = [state(7, "r0"), state(9, "r1")]
    assert llama_c4.resumed_data(saved, 1, 2) is saved[1]
    for rank, world in [(0, 1), (2, 4), (3, 4)]:
        s = llama_c4.resumed_data(saved, rank, world)
        assert s["stream"]["line"] == 9 and len(s["stream"]["tokens"]) == 0 and len(s["buffer"]) == 0
        assert s["rng"] == ("r0", "r1")[rank % 2]
    assert llama_c4.resumed_data(saved[0], 0, 1) is saved[0]  # one process's


@pytest.mark.parametrize("opt", ["adamw", "galore", "ldadam", "adapprox"])
@pytest.mark.slow
def test_layerwise_run_equals_the_ordinary_loop_and_resumes_exactly(opt, corpus, tmp_path):
    common = SMALL + ["--data", corpus, "--optimizer", opt, "--grad-clip", "0"]
    ordinary = tl.main(common + ["--out-dir", str(tmp_path / "a")])
    layerwise = tl.main(common + ["--out-dir", str(tmp_path / "b"), "--layerwise"])
    assert layerwise["val_loss"] == ordinary["val_loss"]
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    tl.main(common + ["--out-dir", str(tmp_path / "c"), "--layerwise", "--stop-after", "4"])
    tl.main(common + ["--out-dir", str(tmp_path / "c"), "--layerwise", "--resume"])
    c = final_weights(tmp_path / "c")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_layerwise_updates_each_parameter_inside_backward_and_frees_its_gradient(corpus, tmp_path, monkeypatch):
    """--layerwise: every parameter is stepped inside loss.backward(), with its own gradient the only one
    alive, and no opt.step() follows (the equality with the ordinary loop, above, holds either way)."""
    seen = {"updates": 0, "outside_backward": 0, "most_gradients": 0, "params": 0}
    in_backward = []
    backward = torch.Tensor.backward

    def watched_backward(self, *args, **kwargs):
        in_backward.append(True)
        try:
            return backward(self, *args, **kwargs)
        finally:
            in_backward.pop()
    step = tl.train_step

    def watched_step(run, batches):
        if run.step == 0:
            params, step_parameter = list(run.raw_model.parameters()), run.opt.step_parameter
            seen["params"] = len(params)

            def watched_step_parameter(p):
                seen["updates"] += 1
                seen["outside_backward"] += not in_backward
                seen["most_gradients"] = max(seen["most_gradients"], sum(q.grad is not None for q in params))
                return step_parameter(p)
            run.opt.step_parameter = watched_step_parameter
            run.opt.step = lambda *a, **k: pytest.fail("--layerwise called opt.step()")
        return step(run, batches)
    monkeypatch.setattr(torch.Tensor, "backward", watched_backward)
    monkeypatch.setattr(tl, "train_step", watched_step)
    result = tl.main(SMALL + ["--data", corpus, "--optimizer", "galore", "--grad-clip", "0", "--layerwise",
                              "--out-dir", str(tmp_path)])
    assert result["steps"] == 6 and seen["updates"] == 6 * seen["params"] == 6 * 39  # every parameter, every step
    assert seen["outside_backward"] == 0 and seen["most_gradients"] == 1


@pytest.mark.parametrize("flags, words", [
    (["--layerwise"], "no global gradient norm ever exists to clip: add --grad-clip 0"),
    (["--layerwise", "--grad-clip", "0", "--grad-accum", "2"], "use --grad-accum 1"),
    (["--layerwise", "--grad-clip", "0", "--optimizer", "adaptive"], "use galore"),
    (["--layerwise", "--grad-clip", "0", "--optimizer", "adafactor"], "cannot step one parameter"),
    pytest.param(["--layerwise", "--grad-clip", "0", "--optimizer", "muon"], "torch's Muon cannot step one parameter",
                 marks=NEEDS_MUON),
    (["--zero"], "start the run with torchrun"),
    pytest.param(["--zero", "--optimizer", "muon"], "ZeroRedundancyOptimizer cannot shard", marks=NEEDS_MUON),
])
def test_layerwise_and_zero_refuse_what_they_cannot_do(flags, words):
    with pytest.raises(SystemExit, match=words):
        tl.parse_args(flags)


@pytest.mark.parametrize("flags, words", [
    (["--zero"], "use --fsdp or --zero, not both"),
    (["--layerwise", "--grad-clip", "0"], "drop --layerwise"),
    (["--optimizer", "adafactor"], "torch's Adafactor fails on sharded weights.*run it without --fsdp"),
])
def test_fsdp_refuses_what_it_cannot_do(flags, words, monkeypatch):
    with pytest.raises(SystemExit, match="--fsdp: it shards the model across torchrun's processes: start the run "
                                         "with torchrun"):
        tl.parse_args(["--fsdp"])  # one process
    monkeypatch.setenv("RANK", "0")  # as under torchrun
    with pytest.raises(SystemExit, match=f"^error: --fsdp: .*{words}"):
        tl.parse_args(["--fsdp", *flags])
    for ok in ([["--optimizer", "muon"]] if hasattr(torch.optim, "Muon") else []) + [["--optimizer", "adapprox"], []]:
        tl.parse_args(["--fsdp", *ok])


@pytest.mark.parametrize("method", ["adamw", "galore", "adaptive", "ldadam", "ldadam-bf16", "adapprox",
                                    "adapprox-b0", "adapprox-f32", "adapprox-full"])
def test_memory_formula_equals_state_bytes_of_a_real_step(method):
    torch.manual_seed(0)
    cfg = llama_c4.LlamaConfig(vocab_size=96, hidden=32, intermediate=80, heads=4, layers=2, max_seq_len=16)
    model = llama_c4.Llama(cfg)
    rank = 5
    groups = la.lowrank_groups(model, rank)
    opt = {"adamw": lambda: torch.optim.AdamW(model.parameters()),
           "galore": lambda: la.GaLoreAdamW(groups),
           "adaptive": lambda: la.AdaptiveAdamW(groups, allocate=False),
           "ldadam": lambda: la.LDAdam(groups),
           "ldadam-bf16": lambda: la.LDAdam(groups, error_dtype=torch.bfloat16),
           "adapprox": lambda: la.Adapprox(model.parameters(), err_tol=0.0),
           "adapprox-b0": lambda: la.Adapprox(model.parameters(), betas=(0.0, 0.999), err_tol=0.0),
           "adapprox-f32": lambda: la.Adapprox(model.parameters(), err_tol=0.0, factor_dtype="float32"),
           "adapprox-full": lambda: la.Adapprox(model.parameters(), err_tol=0.0, k_max_frac=1.0)}[method]()
    idx = torch.randint(0, 96, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    kw = {"ldadam-bf16": dict(error_bytes=2), "adapprox-b0": dict(beta1=0.0), "adapprox-f32": dict(factor_bytes=4),
          "adapprox-full": dict(k_max_frac=1.0)}.get(method, {})
    predicted = bench.predicted_state_bytes(model, method.split("-")[0], rank, **kw)
    assert la.state_bytes(opt) == predicted


@pytest.mark.slow
def test_bench_shard_tabulates_each_ranks_state_and_peak_under_ddp_and_fsdp():
    """Starts torchrun with 2 gloo processes (bench.py shard-one) per optimizer and mode."""
    rows, info = bench.shard_runs(["--model", "tiny", "--rank", "8", "--batch-size", "1", "--seq-len", "32",
                                   "--optimizer", "galore,adafactor", "--modes", "ddp,fsdp"])
    runs = {(r["optimizer"], r["mode"]): r for r in rows}
    assert list(runs) == [("galore", "ddp"), ("galore", "fsdp"), ("adafactor", "ddp"), ("adafactor", "fsdp")]
    assert runs["adafactor", "fsdp"]["refused"].startswith("error: --fsdp: torch's Adafactor")
    mib = 2**20
    for r in (runs["galore", "ddp"], runs["galore", "fsdp"], runs["adafactor", "ddp"]):
        assert [x["rank"] for x in r["ranks"]] == [0, 1]
        for x in r["ranks"]:
            # the weights (FSDP2: this rank's rows), their gradients and the state coexist in step(), all
            # allocated after the baseline; the interpreter and torch (~300 MiB resident) are not counted
            assert 2 * x["params"] + x["state"] <= x["peak"] < 300 * mib, (r["optimizer"], r["mode"], x)
    ddp, fsdp = ([x["state"] for x in runs["galore", m]["ranks"]] for m in ("ddp", "fsdp"))
    assert ddp[0] == ddp[1] and sum(fsdp) == ddp[0] and max(fsdp) < ddp[0]
    ddp, fsdp = ([x["params"] for x in runs["galore", m]["ranks"]] for m in ("ddp", "fsdp"))  # bytes
    assert ddp[0] == ddp[1] == runs["galore", "ddp"]["params"] * 4 and sum(fsdp) == ddp[0]
    # the table: each rank's numbers in rank order, the refusal named under it
    table = bench.shard_table(rows, info)
    cells = {tuple(line.split(" | ")[:2]): line.split(" | ")[2:] for line in table.splitlines()
             if line.startswith("| ")}
    assert cells["| optimizer", "mode"] == ["state", "peak |"] and "(rank 0 / rank 1)" in table
    for (spec, mode), r in runs.items():
        shown = cells[f"| {spec}", bench.SHARD_NAMES[mode]]
        if "refused" in r:
            assert shown[0] == "refused (1)" and f"(1) {spec} --fsdp (FSDP2): {r['refused']}" in table
        else:
            assert shown[0] == " / ".join(f"{x['state'] / mib:.2f}" for x in r["ranks"])
            assert shown[1] == " / ".join(f"{x['peak'] / mib:,.0f}" for x in r["ranks"]) + " |"


@pytest.mark.slow
def test_bench_shard_peak_counts_from_its_start_above_its_baseline():
    """bench.py shard's CPU measurement (as bench.py peak's): resident memory before the model
    (the baseline) and a reset of the peak before the first step, which a larger transient before
    it (here 256 MiB, returned to the OS) must not reach. In a fresh process, as shard-one measures:
    in this one, what earlier tests freed stays resident in malloc's free lists and is reused."""
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import bench\n"
              "meter = bench.ShardPeak(torch.device('cpu'))\n"
              "before = torch.ones(2**26); del before  # 256 MiB\n"
              "meter.start()\n"
              "during = torch.ones(2**25); del during  # 128 MiB\n"
              "print(meter.peak())\n")
    out = subprocess.run([sys.executable, "-c", script, ROOT], capture_output=True, text=True, check=True)
    assert 100 * 2**20 < int(out.stdout) < 200 * 2**20


def test_bench_steps_and_memory_tables(capsys):
    bench.main(["steps", "--model", "tiny", "--optimizer", "adamw,galore,ldadam", "--steps", "1"])
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "---" not in line}
    # | optimizer | normal | first | refresh | amortized | refresh / normal | normal / AdamW | amortized / AdamW |
    assert rows["adamw"][3] == rows["ldadam"][3] == "–" and rows["adamw"][5] == "–"  # no refresh step
    assert float(rows["galore"][3]) > 0 and float(rows["galore"][2]) > 0 and float(rows["adamw"][6]) == 1.0
    bench.main(["memory"])
    out = capsys.readouterr().out
    assert "| 1b | 512 |" in out and "| 60m | 4 |" in out
    with pytest.raises(SystemExit, match="unknown command 'bench'"):
        bench.main(["bench"])


def table_rows(out):
    return [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]


@pytest.mark.slow
def test_bench_peak_measures_each_optimizer_in_a_fresh_process(capsys, xdg_cache):
    # (the docs test runs docs/RESULTS.md's peak commands, with every optimizer, too)
    bench.main(["peak", "--model", "tiny", "--optimizer", "galore,adaptive", "--max-steps", "1",
                "--batch-size", "1", "--seq-len", "16"])
    rows = {(r[0][2:], r[1]): r for r in table_rows(capsys.readouterr().out)}
    assert set(rows) == {("galore", "plain"), ("galore", "layerwise"), ("adaptive", "plain")}  # adaptive: no layer-wise
    assert rows[("galore", "layerwise")][3] == "0" and rows[("galore", "plain")][3] == rows[("galore", "plain")][2]
    assert all(float(r[5].replace(",", "")) > 0 for r in rows.values())
    assert all(r[8:] == ["–", "– |"] for r in rows.values())  # one step: none after the first


@pytest.mark.slow
def test_bench_peak_covers_a_later_refresh_step_with_stagger(capsys, xdg_cache):
    """--update-proj-gap 2 --max-steps 3: steps 2 and 3 refresh half the bases each (stagger), or
    step 3 all of them; the last two columns are those of steps 2 and 3, without step 1's."""
    bench.main(["peak", "--model", "tiny", "--rank", "8", "--optimizer", "galore+stagger", "--modes", "plain",
                "--update-proj-gap", "2", "--max-steps", "3", "--batch-size", "1", "--seq-len", "16"])
    out = capsys.readouterr().out
    assert "| peak of steps 2-3 | step() temporaries, steps 2-3 |" in out
    (row,) = table_rows(out)
    assert row[:2] == ["| galore+stagger", "plain"]
    assert 0 < float(row[8].replace(",", "")) <= float(row[5].replace(",", "")) and float(row[9][:-2]) > 0


def test_bench_steps_full_gap_times_every_step_of_one_gap_with_and_without_stagger(capsys):
    bench.main(["steps", "--model", "tiny", "--rank", "8", "--optimizer", "adamw,galore,galore+stagger",
                "--update-proj-gap", "4", "--full-gap", "--steps", "1"])
    out = capsys.readouterr().out
    assert "each of the T = 4 steps after the first (steps 2 to 5, in which every matrix refreshes once)" in out
    rows = {r[0][2:]: r for r in table_rows(out)}
    # | optimizer | first | median | slowest | at step | slowest / median | mean | mean / AdamW | most bases refreshed |
    assert rows["adamw"][8] == "– |" and rows["galore"][8] == "28 |" and rows["galore+stagger"][8] == "7 |"
    for r in rows.values():
        assert 2 <= int(r[4]) <= 5 and float(r[5]) >= 1 and float(r[3]) >= float(r[2]) > 0
    with pytest.raises(SystemExit, match="--stagger: adamw has no staggered refresh schedule"):
        bench.main(["steps", "--model", "tiny", "--optimizer", "adamw,galore", "--stagger"])


@pytest.mark.slow
def test_bench_refresh_and_steps_over_all_params(capsys):
    bench.main(["refresh", "--model", "tiny", "--rank", "8"])
    rows = table_rows(capsys.readouterr().out)
    assert [r[0][2:] for r in rows] == ["GaLoreAdamW", "AdaptiveAdamW, refresh_keep=None (every vector kept)",
                                        "AdaptiveAdamW, refresh_keep=2 (default)"]
    assert rows[0][2] == "1.00" and all(float(r[1]) > 0 for r in rows)
    bench.main(["steps", "--model", "tiny", "--optimizer", "adamw,galore", "--steps", "1", "--all-params"])
    assert "step() on all 39 tensors of tiny" in capsys.readouterr().out  # 4 × (7 matrices + 2 norms) + 3


def test_adaptive_refresh_holds_at_most_refresh_keep_times_the_bases():
    # docs/RESULTS.md's bound: with refresh_keep=2 a refresh holds about twice the
    # bases' bytes (kept vectors, plus one SVD at a time); keeping every vector
    # holds L full s×s bases. Counted by bench.LiveTensorBytes, whose own
    # counting is checked first on tensors of known size.
    with bench.LiveTensorBytes() as live:
        a = torch.zeros(1000)  # 4,000 bytes
        b = torch.zeros(500) + 1  # 2,000 more (zeros, then add: 2 allocations, one dropped)
        del a
        c = b.view(5, 100)  # a view: no new storage
    assert live.peak == 6000 + 2000 and live.now == 2000 and c.shape == (5, 100)
    s, l, rank, L = 64, 64, 8, 16  # keeping every vector: min(s, budget - L + 1) = s of them
    peaks = {}
    for keep in (None, 2.0):
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, l, generator=g)) for _ in range(L)]
        opt = la.AdaptiveAdamW([{"params": params, "rank": rank, "update_proj_gap": 1}], lr=1e-3, refresh_keep=keep)
        for step in range(2):
            for p in params:  # a decaying spectrum, as real gradients have
                p.grad = (torch.randn(s, s, generator=g) / torch.arange(1.0, s + 1)) @ torch.randn(s, l, generator=g)
            state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
            with bench.LiveTensorBytes(state) as live:
                del state
                opt.step()  # step 2 is a refresh with the state already there
        peaks[keep] = live.peak
    bases, one_svd = 4 * L * s * rank, 4 * (s * s + s * l + s + s * l)  # P; U, Vᵀ, S and the oriented copy
    assert peaks[None] >= 4 * L * s * s  # every matrix's full basis at once
    assert 2 * bases <= peaks[2.0] <= 2 * bases + 2 * one_svd
    assert peaks[2.0] < peaks[None] / 2


def test_training_a_bpe_tokenizer_prints_nothing(corpus, tmp_path, capfd):
    # the tokenizers trainer's progress display wrote blank lines ahead of bench.py loader's table
    bench.train_bpe(str(corpus), 300, tmp_path / "tokenizer.json")
    assert capfd.readouterr() == ("", "")


def test_help_wraps_between_words_only(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        tl.parse_args(["--help"])
    out = capsys.readouterr().out
    words = set(out.split())
    assert not {"adapt", "ive", "sing", "ular_value"} & words  # no word cut in two
    # lines end only at a space or after the '|' of NAME[:a|b|c]: rejoined there, every spec reads whole
    rejoined = re.sub(r"(?<=[|\]])\n\s+(?=[\w\[])", "", out)
    for name, recipe in tl.OPTIMIZERS.items():
        assert recipe.describe(name) in rejoined, recipe.describe(name)


def test_bench_loader_with_a_bpe_tokenizer_trained_on_the_corpus(capsys, corpus, tmp_path):
    pytest.importorskip("tokenizers")
    bench.main(["loader", "--data", corpus, "--bpe", "400", "--seconds", "0.2", "--cache-dir", str(tmp_path)])
    rows = {r[0][2:]: r for r in table_rows(capsys.readouterr().out)}
    assert float(rows["bytes"][2].strip(" |")) == 1.0
    assert float(rows["BPE 400 (trained on the corpus)"][2].strip(" |")) > 1.5  # merges: more than a byte per token
    assert all(float(r[1].replace(",", "")) > 0 for r in rows.values())


def test_bench_sketch_compares_srsi_variants_on_the_same_matrices(capsys, corpus, tmp_path):
    bench.main(["sketch", *SMALL, "--data", corpus, "--out-dir", str(tmp_path), "--k-max-frac", "0.25",
                "--err-tol", "0", "--optimizer", "adapprox+noscaling+float32"])
    out = capsys.readouterr().out
    assert "'row_col_scaling': False" in out and "'factor_dtype': 'float32'" in out  # the variant named is run
    rows = {r[0][2:]: [float(x.strip(" |%")) for x in r[1:]] for r in table_rows(out)}
    assert set(rows) == {"optimal", *bench.SKETCHES}
    for name in bench.SKETCHES:  # no sketch beats the truncated SVD (up to float32's ξ resolution)
        assert rows[name][0] >= rows["optimal"][0] - 1e-3
    assert rows["cold, 5 iterations (paper)"][3] == 100.0


def test_bench_sketch_refuses_an_optimizer_other_than_adapprox(tmp_path):
    with pytest.raises(SystemExit, match="sketches Adapprox's V"):
        bench.main(["sketch", "--optimizer", "galore", "--out-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("opt", ["galore", "adaptive"])
def test_bench_subspaces_compares_the_randomized_refresh_with_the_svd(opt, capsys, corpus, tmp_path):
    bench.main(["subspaces", "--optimizer", opt, *SMALL, "--update-proj-gap", "2", "--rank", "4", "--data", corpus,
                "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    energy = next(line for line in out.splitlines() if line.startswith("| energy captured"))
    median, p5, worst = (float(x.strip(" |")) for x in energy.split(" | ")[1:4])
    # the exact top-r basis captures the most energy of any r-dimensional basis (Eckart-Young)
    assert 0.5 < worst <= p5 <= median <= 1 + 1e-5
    assert ("allocations:" in out) == (opt == "adaptive")


def test_bench_subspaces_kept_measures_the_held_basis_against_the_best_of_its_rank(capsys, corpus, tmp_path):
    specs = ["galore+residual", "galore:gha+residual"]
    bench.main(["subspaces", "--kept", ",".join(specs), *SMALL, "--update-proj-gap", "3", "--rank", "4",
                "--data", corpus, "--out-dir", str(tmp_path)])
    rows = table_rows(capsys.readouterr().out)
    assert [r[0][2:] for r in rows] == specs  # one row per spec
    for r in rows:  # median (5th percentile) in [0, 1], the 5th percentile below the median
        for c in r[2:]:
            median, p5 = map(float, re.fullmatch(r"([\d.]+) \(([\d.]+)\)", c.strip(" |")).groups())
            assert 0 <= p5 <= median <= 1
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert list(kept) == specs
    for spec in specs:  # every low-rank matrix (4 layers x 7) at steps 2-6; step 4 refreshes
        steps = kept[spec]["steps"]
        assert sorted({t for t, *_ in steps}) == [2, 3, 4, 5, 6] and len(steps) == 5 * 28
        assert all(kind == {1: "refresh", 2: "after", 0: "between"}[t % 3] for t, kind, _, _ in steps)
        assert all(0 <= e <= o * (1 + 1e-9) and 0 < o <= 1 for _, _, e, o in steps)  # no basis beats the SVD's
    # at a refresh, the basis measured is the old one, not the SVD of this very gradient (which keeps o)
    assert max(e / o for t, kind, e, o in kept["galore+residual"]["steps"] if kind == "refresh") < 0.999
    with pytest.raises(SystemExit, match="adaptive is not a GaLoreAdamW spec"):
        bench.main(["subspaces", "--kept", "galore,adaptive", "--out-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()  # refused before any work


def test_bench_subspaces_kept_table_holds_the_medians_and_5th_percentiles_of_kept_json(capsys, corpus, tmp_path):
    """Each cell of the --kept table: the median (5th percentile, linear between order statistics) of the
    steps kept.json records, o, e and e/o over every step, e/o over the refresh steps, the steps after them
    and the others, recomputed here in float64."""
    bench.main(["subspaces", "--kept", "galore+residual", *SMALL, "--update-proj-gap", "3", "--rank", "4",
                "--data", corpus, "--out-dir", str(tmp_path)])
    [row] = table_rows(capsys.readouterr().out)
    record = json.loads((tmp_path / "kept.json").read_text())["galore+residual"]
    steps = record["steps"]

    def cell(xs):
        xs = torch.tensor(xs, dtype=torch.float64)
        return torch.quantile(xs, 0.5).item(), torch.quantile(xs, 0.05).item()
    expected = [cell([o for *_, o in steps]), cell([e for _, _, e, _ in steps]), cell([e / o for *_, e, o in steps])]
    expected += [cell([e / o for _, k, e, o in steps if k == kind]) for kind in ("refresh", "after", "between")]
    assert float(row[1]) == pytest.approx(record["val_loss"], abs=5.1e-5)
    for c, (median, p5) in zip(row[2:], expected, strict=True):
        shown = tuple(map(float, re.fullmatch(r"([\d.]+) \(([\d.]+)\)", c.strip(" |")).groups()))
        assert shown == pytest.approx((median, p5), abs=5.1e-5), (c, median, p5)  # to 4 decimals


def test_kept_energy_projects_on_the_side_the_basis_is_for():
    G = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # rank 1: its top direction keeps all of it
    e1 = torch.tensor([[1.0], [0.0]])
    assert bench.kept_energy(G, e1, transposed=False) == pytest.approx((1.0, 1.0))  # ||e1ᵀ G||² = 2 of 2
    assert bench.kept_energy(G, e1, transposed=True) == pytest.approx((0.5, 1.0))  # ||G e1||² = 1 of 2
    assert bench.kept_energy(G, 2 * e1, transposed=False) == pytest.approx((1.0, 1.0))  # the span counts
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 5, generator=g)
    left, right = la.orthonormalize(torch.randn(3, 2, generator=g)), la.orthonormalize(torch.randn(5, 2, generator=g))
    e, o = bench.kept_energy(wide, left, transposed=False)
    assert e == pytest.approx((left.T.double() @ wide.double()).square().sum().item() / wide.square().sum().item())
    assert bench.kept_energy(wide, right, transposed=True)[0] <= o * (1 + 1e-9)
    with pytest.raises(ValueError, match="does not fit the right side"):
        bench.kept_energy(wide, left, transposed=True)
    assert bench.kept_energy(torch.zeros(3, 5), left, transposed=False) is None


def test_kept_energy_is_the_projection_on_the_span_against_the_top_r_singular_values():
    """e = ||Π G||² / ||G||² (left) or ||G Π||² / ||G||² (right), Π = P P⁺ the projector on span(P), built
    without QR; o = the top r = P's columns of G's squared singular values over their sum (float64 eigenvalues)."""
    G = torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 0]])  # singular values 3, 2, 1
    e1e2 = torch.tensor([[1.0, 1.0], [0, 1.0], [0, 0]])  # spans e1, e2: keeps 9 + 4 of 14, the best rank 2 can
    assert bench.kept_energy(G, e1e2, transposed=False) == pytest.approx((13 / 14, 13 / 14))
    e3e4 = torch.tensor([[0, 0], [0, 0], [1.0, 0], [0, 1.0]])  # the right side's e3, e4: keeps 1 of 14
    assert bench.kept_energy(G, e3e4, transposed=True) == pytest.approx((1 / 14, 13 / 14))
    g = torch.Generator().manual_seed(1)
    G = torch.randn(6, 9, generator=g)
    top = lambda r: (lambda s: s[:r].sum() / s.sum())(torch.linalg.eigvalsh(G.double() @ G.double().T).flip(0))
    for transposed, side in ((False, 6), (True, 9)):
        P = torch.randn(side, 3, generator=g) * torch.tensor([1.0, 10.0, 0.1])  # far from orthonormal
        proj = P.double() @ torch.linalg.pinv(P.double())
        kept = G.double() @ proj if transposed else proj @ G.double()
        e, o = bench.kept_energy(G, P, transposed)
        assert e == pytest.approx((kept.square().sum() / G.double().square().sum()).item(), rel=1e-5)
        assert o == pytest.approx(top(3).item(), rel=1e-9) and o < top(4).item()  # r = 3 values, not 4


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch's Muon needs torch >= 2.9")
def test_muon_updates_matrices_by_torch_muon_and_the_rest_by_adamw():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.Linear(6, 8), "norm": nn.LayerNorm(8)})
    twin = nn.ModuleDict({"attn": nn.Linear(6, 8), "norm": nn.LayerNorm(8)})
    twin.load_state_dict(model.state_dict())
    opt = llama_c4.MuonWithAdamW(la.lowrank_groups(model, 2, targets=("attn",)), lr=1e-2, weight_decay=0.1)
    matrix = [twin["attn"].weight]
    rest = [p for p in twin.parameters() if p is not twin["attn"].weight]
    muon = torch.optim.Muon(matrix, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        x = torch.randn(4, 6)
        for m in (model, twin):
            m["norm"](m["attn"](x)).square().sum().backward()
        if step == 1:  # the schedule sets the groups' lr: both inner optimizers follow
            for group in opt.param_groups + muon.param_groups + adamw.param_groups:
                group["lr"] = 5e-3
        opt.step(), muon.step(), adamw.step()
        for o in (opt, muon, adamw):
            o.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    state = opt.state_dict()["state"]  # one state dict holds both halves
    assert set(state) == {0, 1, 2, 3} and set(state[3]) == {"momentum_buffer"}  # (the dense group first)


@pytest.mark.slow
def test_bench_sensitivity_tabulates_noise_amplification_and_the_full_rank_distance(capsys, corpus):
    tiny = ["--model", "tiny", "--steps", "6", "--perturb-step", "2", "--ranks", "2", "--batch-size", "2",
            "--seq-len", "32", "--data", corpus]
    distances = {}
    for flags in ([], ["--float64"]):
        bench.main(["sensitivity", *tiny, *flags])
        out = capsys.readouterr().out
        rows = {r[0][2:]: r for r in table_rows(out)}
        assert {"AdamW", "torch Adafactor", "Adapprox (default)", "Adapprox rank 2 held",
                "Adapprox full rank, clipping off", "Adapprox full rank, clipping off, float32 factors",
                "Adapprox (default), no row/column scaling",
                "Adapprox (default), float32 factors", "Adapprox rank 2 held, float32 factors"} <= set(rows)
        adamw = float(rows["AdamW"][2])
        assert 0 < adamw < 1e-3  # 1e-7 noise moves AdamW's weights by about that much, relative to their movement
        assert all(float(r[3]) > 0 for r in rows.values())  # every run moved its weights
        assert ("float64" in out) == bool(flags)
        distances[bool(flags)] = [float(line.rsplit("= ", 1)[1]) for line in out.splitlines() if " vs AdamW " in line]
    assert len(distances[False]) == len(distances[True]) == 2  # V in float64, then in float32
    # at full rank V is dense and Adapprox is AdamW, to rounding: a float64 model keeps V in float64 either way
    assert all(0 <= d < 1e-9 for d in distances[True]) and all(0 <= d < 1e-5 for d in distances[False])


@pytest.mark.slow
def test_a_bpe_run_resumes_exactly(corpus, tmp_path):
    # the batched BPE encoding in the prefetch thread, and the loader state with it
    pytest.importorskip("tokenizers")
    tok = str(bench.train_bpe(corpus, 400, tmp_path / "bpe" / "tokenizer.json"))
    common = SMALL + ["--data", corpus, "--tokenizer", tok, "--optimizer", "galore"]
    whole = tl.main(common + ["--out-dir", str(tmp_path / "a")])
    tl.main(common + ["--out-dir", str(tmp_path / "b"), "--stop-after", "3"])
    resumed = tl.main(common + ["--out-dir", str(tmp_path / "b"), "--resume"])
    assert resumed["val_loss"] == whole["val_loss"]
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plots_or_a_clear_message(corpus, tmp_path, monkeypatch):
    bench.main(["compare", *SMALL, "--data", corpus, "--out-dir", str(tmp_path), "--optimizer", "adaptive,adapprox",
                "--log-interval", "1"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install matplotlib"):
            bench.main(["plot", "--out-dir", str(tmp_path)])
        return
    written = bench.main(["plot", "--out-dir", str(tmp_path)])
    assert {p.name for p in written} == {"loss_curves.png", "ranks_adaptive-seed0.png", "ranks_adapprox-seed0.png"}
    assert all(p.stat().st_size > 1000 for p in written)
    assert {p.name for p in bench.main(["plot", "--out-dir", str(tmp_path / "adaptive-seed0")])} == {
        "loss_curves.png", "ranks_adaptive-seed0.png"}  # one run's folder works too
    block_matplotlib(monkeypatch)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        bench.main(["plot", "--out-dir", str(tmp_path)])


def test_plot_results_draws_loss_against_state_and_refuses_a_malformed_file(tmp_path, monkeypatch, capsys):
    """bench.py plot --results: one point per optimizer from a results table or compare's results.json,
    the Pareto front; a malformed file is refused with one line, before matplotlib is needed."""
    table = {"title": "t", "rows": [
        {"label": "AdamW", "val_loss": 2.1, "spread": 0.05, "state_pct": 100},
        {"label": "low-rank", "val_loss": 1.8, "spread": 0.01, "state_pct": 30, "lr": 0.04},
        {"label": "beaten", "val_loss": 2.0, "state_pct": 50, "from": "RESULTS.md#somewhere"},
        {"label": "tiny", "val_loss": 2.2, "spread": 0, "state_pct": 1.3}]}
    good = tmp_path / "results.json"
    good.write_text(json.dumps(table))
    title, rows = bench.read_results(good)
    assert title == "t" and [r["label"] for r in rows] == ["AdamW", "low-rank", "beaten", "tiny"]
    assert rows[2]["spread"] == 0  # left out: no error bar
    assert [r["label"] for r in bench.pareto_front(rows)] == ["tiny", "low-rank"]  # in order of state
    # compare's results.json: each optimizer at its best lr, median ± half the range, state as % of adamw's
    runs = [dict(optimizer=o, lr=lr, seed=s, val_loss=v, state_mb=m) for o, lr, s, v, m in [
        ("adamw", 0.003, 0, 2.2, 2.0), ("adamw", 0.003, 1, 2.4, 2.0), ("adamw", 0.006, 0, 2.0, 2.0),
        ("adamw", 0.006, 1, 2.1, 2.0), ("galore", 0.01, 0, 1.9, 0.5), ("galore", 0.01, 1, 1.95, 0.5)]]
    compared = tmp_path / "compare.json"
    compared.write_text(json.dumps(runs))
    assert bench.read_results(compared) == (None, [
        dict(label="adamw", lr=0.006, val_loss=pytest.approx(2.05), state_pct=100, spread=pytest.approx(0.05)),
        dict(label="galore", lr=0.01, val_loss=pytest.approx(1.925), state_pct=25, spread=pytest.approx(0.025))])
    bad = tmp_path / "bad.json"
    for text, why in [("{not json", "not JSON"), ("[]", "not all runs of bench.py compare"),
                      (json.dumps(runs[4:]), "no adamw run"), (json.dumps({"rows": []}), "non-empty"),
                      (json.dumps({"rows": [{"label": "A", "val_loss": 2.0}]}), 'A: "state_pct" must be a number'),
                      (json.dumps({"rows": [{"label": "A", "val_loss": "2.0", "state_pct": 9}]}),
                       'A: "val_loss" must be a number'),
                      (json.dumps({"rows": [{"label": "A", "val_loss": 2, "state_pct": 9, "spread": -1}]}),
                       '"spread" must be a number >= 0'),
                      (json.dumps({"rows": [{"label": "A", "val_los": 2, "state_pct": 9}]}), "unknown key"),
                      (json.dumps({"rows": [{"val_loss": 2, "state_pct": 9}]}), '"label" must be')]:
        bad.write_text(text)
        with pytest.raises(SystemExit) as e:
            bench.main(["plot", "--results", str(bad)])
        assert why in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(SystemExit, match="no such file"):
        bench.main(["plot", "--results", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="--out names the picture of --results"):
        bench.main(["plot", "--out", str(tmp_path / "x.png")])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install matplotlib"):
            bench.main(["plot", "--results", str(good)])
    else:
        written = bench.main(["plot", "--results", str(good), "--out", str(tmp_path / "pic" / "state.png")])
        assert written == [tmp_path / "pic" / "state.png"] and written[0].stat().st_size > 1000
        assert bench.main(["plot", "--results", str(compared)]) == [tmp_path / "loss_vs_state.png"]  # the default
        assert (tmp_path / "loss_vs_state.png").stat().st_size > 1000
    block_matplotlib(monkeypatch)
    bad.write_text(json.dumps({"rows": [{"label": "A", "val_loss": 2.0}]}))
    with pytest.raises(SystemExit, match="state_pct"):  # the file is checked first
        bench.main(["plot", "--results", str(bad)])
    with pytest.raises(SystemExit, match=r"pip install matplotlib \(or --out FILE\.svg"):
        bench.main(["plot", "--results", str(good)])


SVG = "{http://www.w3.org/2000/svg}"


def test_plot_results_as_svg_needs_no_matplotlib_and_marks_each_row_the_front_and_muon(tmp_path, monkeypatch):
    """bench.py plot --results with an --out ending in .svg: well-formed SVG written without matplotlib, one
    marker per row, the Pareto front's polyline through exactly the front's markers in order of state, a line
    across at Muon's loss exactly when a row is Muon's; text escaped; the same file, the same bytes."""
    import xml.etree.ElementTree as ET
    block_matplotlib(monkeypatch)
    rows = [{"label": "AdamW", "val_loss": 2.1, "spread": 0.05, "state_pct": 100},  # not in order of state
            {"label": "Muon (torch)", "val_loss": 1.7, "spread": 0.02, "state_pct": 60},  # front: the least loss
            {"label": "same state", "val_loss": 1.9, "spread": 0.02, "state_pct": 30},  # beaten by low-rank alone
            {"label": "low-rank", "val_loss": 1.8, "spread": 0.01, "state_pct": 30},  # front
            {"label": "tiny <\"&'>", "val_loss": 2.2, "state_pct": 1.3}]  # front: the least state

    def front(rows):  # the sweep in order of state (then loss): a point is on it if its loss is below all before
        kept, best = [], math.inf
        for i in sorted(range(len(rows)), key=lambda i: (rows[i]["state_pct"], rows[i]["val_loss"])):
            if rows[i]["val_loss"] < best:
                kept.append(i)
                best = rows[i]["val_loss"]
        return kept

    def draw(rows, name):
        table = tmp_path / f"{name}.json"
        table.write_text(json.dumps({"title": "a <title> & more\nits second line", "rows": rows}))
        assert bench.main(["plot", "--results", str(table), "--out", str(tmp_path / f"{name}.svg")]) == [
            tmp_path / f"{name}.svg"]
        root = ET.parse(tmp_path / f"{name}.svg").getroot()  # well-formed XML
        assert root.tag == SVG + "svg"
        markers = [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter(SVG + "circle")
                   if c.get("class") == "point"]
        [polyline] = [p for p in root.iter(SVG + "polyline") if p.get("class") == "front"]
        corners = [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]
        muon = [float(line.get("y1")) for line in root.iter(SVG + "line") if line.get("class") == "muon"]
        texts = [t.text for t in root.iter(SVG + "text")]
        return markers, corners, muon, texts

    markers, corners, muon, texts = draw(rows, "with_muon")
    assert [rows[i]["label"] for i in front(rows)] == ["tiny <\"&'>", "low-rank", "Muon (torch)"]
    assert len(markers) == len(rows) and corners == [markers[i] for i in front(rows)]
    assert muon == [markers[1][1]]  # across at Muon's loss
    assert {"a <title> & more", "its second line", "tiny <\"&'>"} <= set(texts)  # escaped, read back as written
    first = (tmp_path / "with_muon.svg").read_bytes()
    draw(rows, "with_muon")
    assert (tmp_path / "with_muon.svg").read_bytes() == first  # deterministic
    others = [r for r in rows if not r["label"].startswith("Muon")]
    markers, corners, muon, _ = draw(others, "without_muon")
    assert [others[i]["label"] for i in front(others)] == ["tiny <\"&'>", "low-rank"]
    assert len(markers) == 4 and corners == [markers[i] for i in front(others)] and muon == []
    with pytest.raises(SystemExit, match="must end in .png or .svg"):
        bench.main(["plot", "--results", str(tmp_path / "with_muon.json"), "--out", str(tmp_path / "p.jpg")])


def test_read_results_takes_each_optimizer_at_the_lr_of_least_median_loss_over_three_seeds(tmp_path):
    """compare's results.json with 3 seeds, where the median and the mean disagree: the best lr is the one of
    least median loss; the row's spread is half the range of its seeds (not their deviation), its state the
    median of its runs' as % of the state of the AdamW runs drawn (so AdamW's own point is at 100 %)."""
    runs = [dict(optimizer=o, lr=lr, seed=s, val_loss=v, state_mb=m) for o, lr, vs, ms in [
        ("adamw", 0.001, (2.0, 2.1, 2.5), (2.0, 2.0, 2.0)),  # median 2.1, mean 2.2: the best by its median
        ("adamw", 0.002, (2.15, 2.15, 2.15), (4.0, 4.0, 4.0)),  # median = mean 2.15: the best by the mean
        ("galore", 0.01, (1.9, 1.92, 2.3), (0.5, 0.5, 0.6))] for s, (v, m) in enumerate(zip(vs, ms))]
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(runs))
    assert bench.read_results(path) == (None, [
        dict(label="adamw", lr=0.001, val_loss=pytest.approx(2.1), state_pct=pytest.approx(100),
             spread=pytest.approx((2.5 - 2.0) / 2)),
        dict(label="galore", lr=0.01, val_loss=pytest.approx(1.92), state_pct=pytest.approx(100 * 0.5 / 2.0),
             spread=pytest.approx((2.3 - 1.9) / 2))])


@pytest.mark.parametrize("data, why", [
    ({"rows": [{"label": "A", "val_loss": True, "state_pct": 9}]}, 'A: "val_loss" must be a number'),
    ({"rows": [{"label": "A", "val_loss": math.nan, "state_pct": 9}]}, 'A: "val_loss" must be a number'),
    ({"rows": [{"label": "A", "val_loss": 2, "state_pct": math.inf}]}, 'A: "state_pct" must be a number'),
    ({"rows": [{"label": "A", "val_loss": 2, "state_pct": 9, "spread": math.nan}]}, '"spread" must be a number >= 0'),
    ({"rows": [{"label": "A", "val_loss": 2, "state_pct": 0}]}, 'A: "state_pct" must be > 0'),  # a log axis
    ({"rows": [{"label": "", "val_loss": 2, "state_pct": 9}]}, 'row 1: "label" must be a non-empty string'),
    ({"rows": [{"label": "A", "val_loss": 2, "state_pct": 9}], "note": "x"}, "unknown key(s) note"),
    ([dict(optimizer="adamw", seed=0, val_loss=2.0, state_mb=2.0)], "not all runs of bench.py compare"),  # no lr
    ([dict(optimizer="adamw", lr=0.01, val_loss=math.nan, state_mb=2.0)], "not all runs of bench.py compare"),
    ([dict(optimizer="adamw", lr=0.01, val_loss=2.0, state_mb=True)], "not all runs of bench.py compare")])
def test_read_results_refuses_a_row_that_cannot_be_drawn(tmp_path, data, why):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes and reads them
    with pytest.raises(SystemExit) as e:
        bench.read_results(path)
    assert why in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_pareto_front_is_every_point_no_other_beats_ties_and_duplicates_included():
    """By the definition, on points of a small grid (many ties): a row is on the front when no other row is at
    most as high in both loss and state and lower in one; two equal rows beat neither each other (both on it)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        rows = [dict(label=str(i), val_loss=float(v), state_pct=float(s))
                for i, (v, s) in enumerate(torch.randint(1, 5, (8, 2), generator=g).tolist())]
        on = [r for r in rows if not any(o["val_loss"] <= r["val_loss"] and o["state_pct"] <= r["state_pct"] and
                                         (o["val_loss"], o["state_pct"]) != (r["val_loss"], r["state_pct"])
                                         for o in rows)]
        front = bench.pareto_front(rows)
        assert sorted(r["label"] for r in front) == sorted(r["label"] for r in on), rows
        assert [r["state_pct"] for r in front] == sorted(r["state_pct"] for r in on)  # in order of state
    twins = [dict(label=k, val_loss=2.0, state_pct=s) for k, s in (("a", 10.0), ("b", 10.0), ("c", 20.0))]
    assert [r["label"] for r in bench.pareto_front(twins)] == ["a", "b"]


def test_svg_draws_a_muon_line_and_band_for_each_row_whose_label_starts_with_muon(tmp_path):
    """A dotted line across at each Muon row's loss, over a band exactly as high as that row's error bar;
    none for a row that merely names Muon."""
    import xml.etree.ElementTree as ET
    rows = [{"label": "AdamW (Muon's lr)", "val_loss": 2.1, "spread": 0.05, "state_pct": 100},
            {"label": "Muon", "val_loss": 1.8, "spread": 0.03, "state_pct": 50},
            {"label": "Muon (torch)", "val_loss": 1.9, "spread": 0.01, "state_pct": 60}]
    bench.svg_loss_vs_state(None, rows, tmp_path / "p.svg")
    root = ET.parse(tmp_path / "p.svg").getroot()
    circles = [c for c in root.iter(SVG + "circle") if c.get("class") == "point"]
    bars = {round(float(p.get("d")[1:].split(",")[0]), 1): p.get("d") for p in root.iter(SVG + "path")}
    lines = [float(line.get("y1")) for line in root.iter(SVG + "line") if line.get("class") == "muon"]
    assert lines == [float(circles[i].get("cy")) for i in (1, 2)]  # Muon's rows alone, at their loss
    bands = [(float(r.get("y")), float(r.get("height"))) for r in root.iter(SVG + "rect") if r.get("fill-opacity")]
    assert len(bands) == 2
    for i, (top, height) in zip((1, 2), bands):
        hi, lo = map(float, re.match(r"M[\d.]+,([\d.]+)V([\d.]+)", bars[float(circles[i].get("cx"))]).groups())
        assert top == hi and height == pytest.approx(lo - hi, abs=0.11)  # the band: the row's ± its spread


def test_adaptive_defaults_to_the_residual_and_galore_does_not():
    p = nn.Parameter(torch.randn(4, 6))
    assert la.AdaptiveAdamW([{"params": [p], "rank": 2}]).param_groups[0]["residual"] is True
    assert la.GaLoreAdamW([{"params": [p], "rank": 2}]).param_groups[0]["residual"] is False
    name, over = tl.parse_optimizer("adaptive:gap+noresidual")
    assert name == "adaptive" and over == {"rank_metric": "gap", "residual": False}


# README.md and docs/RESULTS.md: every command each shows is run, in order, in a scratch
# folder, as written except for the appendices below, which shrink it to a few steps of
# a tiny model: argparse keeps the last value of a repeated flag, so appending overrides.
# (--threads 1: a command run in this process must not change the suite's thread count.)
# RESULTS.md's hundred commands are dealt into DOCS_PARTS tests that can run side by side;
# a command shown in both files runs once, with README.md's.
DOCS = ["README.md", "docs/RESULTS.md"]
DOCS_PARTS = {"README.md": 1, "docs/RESULTS.md": 4}
RESULTS_CHECKPOINTS = {"out/default", "out/zero-$o"}  # folders of runs whose checkpoint the test checks
README_TRAIN = ["--max-steps", "4", "--eval-interval", "2", "--warmup-steps", "1", "--batch-size", "2",
                "--seq-len", "32", "--val-batches", "1", "--shuffle-buffer", "8", "--update-proj-gap", "2",
                "--model", "tiny", "--quiet", "--threads", "1"]
README_APPEND = {"train_tiny_llama.py": README_TRAIN,
                 "bench.py compare": README_TRAIN + ["--seeds", "1", "--lr-sweep", "1", "--widen", "0"],  # one run per spec
                 # one thread: commands that differ only in --threads run once
                 "bench.py steps": ["--model", "tiny", "--rank", "8", "--steps", "1", "--threads", "1"],
                 # the layer-wise mode's peak is measured by test_bench_peak_measures_each_optimizer_in_a_fresh_process
                 "bench.py peak": ["--model", "tiny", "--rank", "8", "--max-steps", "1", "--seq-len", "16",
                                   "--modes", "plain"],
                 "bench.py refresh": ["--model", "tiny", "--rank", "8", "--threads", "1"],
                 "bench.py loader": ["--seconds", "0.2", "--bpe", "300"],
                 "bench.py sketch": README_TRAIN,
                 "bench.py subspaces": README_TRAIN,
                 "bench.py shard": ["--model", "tiny", "--rank", "8", "--seq-len", "32", "--optimizer", "galore",
                                    "--modes", "fsdp"],
                 "bench.py sensitivity": ["--model", "tiny", "--steps", "4", "--perturb-step", "2", "--ranks", "2",
                                          "--batch-size", "2", "--seq-len", "16"]}


def readme_commands(doc="README.md"):
    """Shell commands of README.md (or another of DOCS): its ```bash blocks (joining
    continued lines) and its inline `python ...` / `torchrun ...` spans."""
    text = open(os.path.join(ROOT, doc)).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [" ".join(c.split()) for c in re.findall(r"`((?:python|torchrun) [^`]+)`", prose)]  # may wrap
    return commands


def shrink(command, corpus, tokenizer):
    """The command as run by the test (see README_APPEND), or None for pip and pytest,
    which .ci/run runs exactly as the README shows them."""
    if command.startswith("python -m pytest"):
        return None
    command = command.replace("pip install -r requirements.txt && ", "")
    command = command.replace("/data/c4/en", corpus)  # the embedded corpus is C4-format shards
    if tokenizer:
        command = command.replace("/data/t5-base/tokenizer.json", tokenizer)
    else:  # without the tokenizers package: byte-level, tokenizer-free
        command = re.sub(r" --tokenizer \S+", "", command)
    command = re.sub(r"--nproc_per_node \d+", "--nproc_per_node 2", command)
    # the tiny model's matrices have 64 as their short side: a larger --rank is refused there
    command = re.sub(r"--rank (\d+)", lambda m: f"--rank {min(int(m[1]), 64)}", command)
    # a loop runs its first and last value: the others repeat the same command
    # (a torchrun loop only its last: each pass starts processes, seconds each)
    def first_and_last(m):
        values = m[2].split()
        kept = [values[-1]] if " torchrun " in command else [values[0], values[-1]]
        return f"for {m[1]} in {' '.join(dict.fromkeys(kept))};"
    command = re.sub(r"^for (\w+) in ([^;]+);", first_and_last, command)
    command = command.replace("torchrun ", f"{sys.executable} -m torch.distributed.run ")

    def append(m):
        key = next((k for k in README_APPEND if m.group(0).startswith(("python " + k, k)) or
                    f"run --standalone --nproc_per_node 2 {k}" in m.group(0)), None)
        if key is None:
            return m.group(0)
        extra, shown = README_APPEND[key], m.group(0)
        for flag, value in zip(extra, extra[1:]):  # a value appended makes the one shown moot: drop it, so
            if flag.startswith("--") and not value.startswith("--"):  # that commands differing only there run once
                shown = re.sub(rf" {re.escape(flag)} [^\s$]+(?=\s|$)", "", shown)
        return shown + " " + " ".join(extra)
    return re.sub(r"(python|torch\.distributed\.run) [^;&|\n]*?(?=\s*(;|&&|\|\||$))", append, command)


def test_docs_python_snippets_run_on_the_models_they_name(capsys):
    snippets = lambda doc: re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, doc)).read(), re.S)
    [api] = snippets("README.md")  # the API snippet
    [layerwise] = snippets("docs/DESIGN.md")  # the layer-wise snippet, under "Where it runs"
    # the API snippet, on the Hugging Face GPT-2 its comment says works as is
    named = re.search(r"# model = (transformers\.GPT2LMHeadModel\(.*?\)\)) works", api, re.S).group(1)
    import transformers
    torch.manual_seed(0)
    model = eval(named.replace("\n#", ""), {"transformers": transformers})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a rank cut down to the short side
        exec(api, {"model": model})
    assert capsys.readouterr().out.strip() == "0 {}"  # state_bytes before the first step, as commented
    # the layer-wise snippet, on the tiny LLaMA of the script: every parameter moves inside backward
    torch.manual_seed(0)
    model = llama_c4.Llama(tiny_config())
    before = [p.detach().clone() for p in model.parameters()]
    tokens = torch.randint(0, 64, (2, 17))
    exec(layerwise, {"model": model, "batches": [(tokens[:, :-1], tokens[:, 1:])]})
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_readme_commands_are_shown_in_full():
    commands = readme_commands()
    assert any(c.startswith("pip install -r requirements.txt && python train_tiny_llama.py") for c in commands)
    assert any(c.startswith("python bench.py compare") for c in commands)
    assert any(c.startswith("torchrun") for c in commands)
    assert "python -m pytest -q -n auto --dist loadgroup" in commands
    results = readme_commands("docs/RESULTS.md")
    assert sum("python bench.py compare" in c for c in results) >= 10
    for command in ("python bench.py steps", "python bench.py peak", "python bench.py refresh",
                    "python bench.py sketch", "python bench.py loader", "python bench.py memory", "torchrun"):
        assert any(command in c for c in results), command
    for c in commands + results:
        assert "..." not in c and "DIR" not in c, c


def markdown_links(doc):
    """(target, anchor, line) of every relative link and image of a markdown file."""
    text = open(os.path.join(ROOT, doc)).read()
    return [(m[1] or doc.rsplit("/", 1)[-1], m[2], text[:m.start()].count("\n") + 1)
            for m in re.finditer(r"\]\(([^)#\s]*)(?:#([^)]*))?\)", text) if not re.match(r"[a-z]+://", m[1])]


def markdown_anchors(path):
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS + ["docs/DESIGN.md"])
def test_docs_links_resolve_and_stay_inside_the_repository(doc):
    # every link and image points at a file of the repository; no text points outside it
    links = markdown_links(doc)
    for target, anchor, line in links:
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
        assert path.startswith(ROOT + os.sep) and os.path.exists(path), f"{doc}:{line}: {target}"
        assert not anchor or anchor in markdown_anchors(path), f"{doc}:{line}: {target}#{anchor}"
    text = open(os.path.join(ROOT, doc)).read()
    assert "../" not in text.replace(ROOT, ""), f"{doc} points to a path above the repository"
    assert not re.search(r"\b[0-9a-f]{7}\b", text), f"{doc}: a version-control hash"
    if doc == "docs/RESULTS.md":
        images = {t for t, _, _ in links if t.endswith((".png", ".svg"))}
        assert images == {p.name for p in Path(ROOT, "docs").glob("*.[ps][nv]g")}  # every figure shown


@pytest.mark.parametrize("size, picture", [("tiny", "loss_vs_state.svg"), ("9m", "loss_vs_state_9m.svg")])
def test_the_results_file_of_the_picture_holds_the_rows_of_its_results_table(tmp_path, size, picture):
    """docs/<size>_results.json, which `bench.py plot --results` draws as docs/<picture>, holds
    docs/RESULTS.md's table of every optimizer on that model row for row: its numbers live in one table.
    The SVG RESULTS.md shows (and the README, for the tiny model) is today's drawing of it, byte for byte."""
    text = open(os.path.join(ROOT, "docs", "RESULTS.md")).read()
    section = text.split(f"\n## Every optimizer on the {size} model\n", 1)[1].split("\n## ", 1)[0]
    readme = open(os.path.join(ROOT, "README.md")).read()
    command = f"python bench.py plot --results docs/{size}_results.json --out docs/{picture}"
    assert command in section and f"]({picture})" in section
    if size == "tiny":
        assert command in readme and f"](docs/{picture})" in readme
    results = os.path.join(ROOT, "docs", f"{size}_results.json")
    bench.main(["plot", "--results", results, "--out", str(tmp_path / "p.svg")])
    assert (tmp_path / "p.svg").read_bytes() == Path(ROOT, "docs", picture).read_bytes()
    table = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    title, rows = bench.read_results(Path(ROOT, "docs", f"{size}_results.json"))
    assert len(rows) == len(table) >= 9
    for row, line in zip(rows, table):
        _, lr, loss, state, where = [c.strip() for c in line.strip("|").split("|")]
        assert float(lr.split()[0].rstrip("\\*")) == row["lr"], line
        assert loss.strip("*") == f"{row['val_loss']:.4f} ± {row['spread']:.4f}", line
        assert float(state) == row["state_pct"] and where.endswith(f"(#{row['from'].split('#')[1]})"), line
    assert {r["label"].split()[0] for r in rows} >= {"AdamW", "GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox",
                                                     "Adafactor", "Muon"}


def test_the_quick_start_time_is_the_measured_default_run():
    """The README: the default run takes "under a minute on a 2-core CPU, see the default run": docs/RESULTS.md
    measured it on a 2-core machine, AdamW under a minute at 1 thread (the tiny model's default on a CPU, see
    test_small_models_on_cpu_default_to_one_thread) and at 2."""
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert "under a minute on a 2-core CPU, see [the default run](docs/RESULTS.md#the-default-run)" in readme
    text = open(os.path.join(ROOT, "docs", "RESULTS.md")).read()
    assert "measured on a 2-core" in " ".join(text.split("\n## ", 1)[0].split())
    section = text.split("\n### The default run\n", 1)[1].split("\n### ", 1)[0]
    assert "python train_tiny_llama.py --out-dir out/default\n" in section  # the default run, in out/default
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| AdamW")]
    seconds = {threads: float(wall.removesuffix(" s")) for _, _, threads, wall, *_ in rows}
    assert set(seconds) == {"1", "2"} and max(seconds.values()) < 60, seconds


def test_the_promise_map_names_tests_of_this_file():
    """The comment at the top of this file maps each README promise to its tests: every name there (a
    trailing * standing for several) is a test of this file, and every entry names one (or says why none)."""
    source = open(os.path.join(ROOT, "test_train_tiny_llama.py")).read()
    block = source.split("\n# What the README promises, and the test that checks it", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"\n#   (?! )", block)[1:]
    defined = re.findall(r"^def (test_\w+)\(", source, re.M)
    assert len(entries) >= 50
    for entry in entries:
        named = re.findall(r"\btest_\w+\*?", re.split(r" ->\s", entry, 1)[1])
        assert named or "no test:" in entry, entry
        for name in named:
            assert any(re.fullmatch(re.escape(name).replace(r"\*", r"\w+"), d) for d in defined), name


def test_the_tests_the_docs_name_exist():
    """A test the documentation names by its function name is one of the suite's."""
    named = {name for doc in ("README.md", "docs/RESULTS.md", "docs/DESIGN.md")
             for name in re.findall(r"`(test_\w+)`", open(os.path.join(ROOT, doc)).read())}
    defined = {name for path in ("test_lowrank_adam.py", "test_train_tiny_llama.py")
               for name in re.findall(r"^def (test_\w+)\(", open(os.path.join(ROOT, path)).read(), re.M)}
    assert named and named <= defined, named - defined


def run_command(command, capsys):
    """(exit status, output) of a command run in the current folder. A plain
    `python train_tiny_llama.py|bench.py ARGS` runs in this process through the
    script's main(ARGS), which is all its `__main__` does, and so does each pass
    of a `for` loop over such a command (the README's `$(python -c "print(K/N)")`
    computed as bash would); anything else with shell syntax (&&), or torchrun,
    runs through bash."""
    loop = re.fullmatch(r"for (\w+) in ([^;]+); do (python (?:train_tiny_llama|bench)\.py [^;&|]*); done", command)
    if loop:
        var, values, body = loop.groups()
        outs = []
        for value in values.split():
            line = re.sub(r'\$\(python -c "print\((\d+)/(\d+)\)"\)', lambda m: str(int(m[1]) / int(m[2])),
                          body.replace(f"${var}", value))
            assert "$" not in line, line  # nothing else for bash to expand
            status, out = run_command(line, capsys)
            outs.append(out)
            if status:
                break
        return status, "".join(outs)
    argv = shlex.split(command)
    if re.search(r"[;&|]", command) or argv[:2] not in (["python", "train_tiny_llama.py"], ["python", "bench.py"]):
        out = subprocess.run(["bash", "-c", f"set -e; {command}"], capture_output=True, text=True, timeout=600)
        return out.returncode, out.stdout + out.stderr
    try:
        (tl.main if argv[1] == "train_tiny_llama.py" else bench.main)(argv[2:])
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return status, out.out + out.err


def out_dir(run):
    """The --out-dir a command names, or None."""
    m = re.search(r"--out-dir (\S+)", run)
    return m[1] if m else None


def docs_part(doc, part, corpus, tokenizer):
    """(command shown, command run) pairs of part ``part`` of ``doc``'s commands, shrunk, in
    order: each command once (pip and pytest left out, and for RESULTS.md those README.md
    shows), commands naming one --out-dir in one part, the folders dealt out in turn."""
    shown_first = set() if doc == "README.md" else {shrink(c, corpus, tokenizer) for c in readme_commands()}
    runs = {}
    for command in readme_commands(doc):
        run = shrink(command, corpus, tokenizer)
        if run is not None and run not in shown_first:
            runs.setdefault(run, command)
    folder = {run: out_dir(run) or run for run in runs}  # a command without a folder is one of its own
    dealt = {f: k % DOCS_PARTS[doc] for k, f in enumerate(dict.fromkeys(folder.values()))}
    return [(command, run) for run, command in runs.items() if dealt[folder[run]] == part]


def test_the_docs_parts_hold_every_command_once_and_each_folder_in_one_part():
    for doc in DOCS:
        parts = [docs_part(doc, k, "CORPUS", "TOKENIZER") for k in range(DOCS_PARTS[doc])]
        runs = [run for part in parts for _, run in part]
        expected = {shrink(c, "CORPUS", "TOKENIZER") for c in readme_commands(doc)} - {None}
        if doc != "README.md":
            expected -= {shrink(c, "CORPUS", "TOKENIZER") for c in readme_commands()}
        assert len(runs) == len(set(runs)) and set(runs) == expected
        assert all(len(part) >= 10 for part in parts)  # none empty: the work is shared
        folders = [{out_dir(run) for _, run in part} - {None} for part in parts]
        assert all(not (a & b) for k, a in enumerate(folders) for b in folders[k + 1:])
    parts = range(DOCS_PARTS["docs/RESULTS.md"])
    results = [run for k in parts for _, run in docs_part("docs/RESULTS.md", k, "C", "T")]
    assert RESULTS_CHECKPOINTS <= {out_dir(run) for run in results}  # each checked by the part that runs it
    plot = [k for k in parts for _, run in docs_part("docs/RESULTS.md", k, "C", "T") if "out/heatmap" in run]
    assert len(plot) == 2 and plot[0] == plot[1]  # `bench.py plot --out-dir` reads its compare's folder


@pytest.mark.filterwarnings("ignore:.*exceeds (min|the sum):UserWarning")  # rank 128 on the tiny model
@pytest.mark.parametrize("doc,part", [(doc, k) for doc in DOCS for k in range(DOCS_PARTS[doc])])
@pytest.mark.slow
def test_every_docs_command_runs(doc, part, corpus, xdg_cache, tmp_path, monkeypatch, capsys):
    """Each command of README.md, and of docs/RESULTS.md, in order, in a scratch folder
    (one per part, see ``docs_part``), shrunk as README_APPEND says. Without matplotlib, a
    command that plots a PNG must fail with the install hint before training, and then runs
    without --plot (an SVG needs none)."""
    for name in ("lowrank_adam.py", "lowrank_engine.py", "llama_c4.py", "train_tiny_llama.py", "bench.py",
                 "requirements.txt", "docs/tiny_results.json",  # the tables `bench.py plot --results` draws
                 "docs/9m_results.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg_cache))  # the embedded corpus, built once per session
    tokenizer = None
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        tok.train_from_iterator(["a tokenizer for the README test"] * 10, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = str(tmp_path / "tokenizer.json")
        tok.save(tokenizer)
    except ImportError:
        pass
    try:
        import matplotlib  # noqa: F401
        plots = True
    except ImportError:
        plots = False
    ran, commands = 0, docs_part(doc, part, corpus, tokenizer)
    for command, run in commands:
        svg = re.search(r"bench\.py plot .*--out \S+\.svg(\s|$)", run)  # drawn by Python alone
        if not plots and ("--plot" in run or "bench.py plot" in run and not svg):
            status, out = run_command(run, capsys)
            assert status == 1 and "pip install matplotlib" in out, f"{command}\n{out[-3000:]}"
            if "--plot" not in run:
                continue
            run = run.replace(" --plot", "")
        status, out = run_command(run, capsys)
        assert status == 0, f"{doc} command failed: {command}\nran: {run}\n{out[-5000:]}"
        ran += 1
    if doc == "README.md":
        assert ran >= 12
        assert (tmp_path / "out" / "ckpt.pt").exists() and (tmp_path / "out" / "c4-130m" / "ckpt.pt").exists()
    else:  # the default run and the torchrun ZeRO loop (over one optimizer, adapprox) leave checkpoints
        assert ran >= 10
        for folder in {out_dir(run) for _, run in commands} & RESULTS_CHECKPOINTS:
            assert (tmp_path / folder.replace("$o", "adapprox") / "ckpt.pt").exists(), folder


def test_bench_trace_counts_the_functions_that_run_and_their_code_lines(capsys):
    """bench.py trace: the functions of lowrank_adam.py that two GaLoreAdamW steps run (the default SVD
    refresh: no range finder), and code lines without docstrings, comments or blank lines."""
    functions, lines = bench.reader_path(la.GaLoreAdamW)
    assert {"GaLoreAdamW._update", "GaLoreAdamW._refresh", "gradient_spectrum", "_Base.step"} <= set(functions)
    assert "randomized_spectrum" not in functions and "LDAdam._update" not in functions
    source, start = inspect.getsourcelines(la.linalg_dtype)  # a def line, a docstring, one statement
    assert bench.code_lines(la.linalg_dtype.__code__) == {start, start + len(source) - 1}
    def total():
        return sum(i * i for i in range(3))
    genexpr = next(c for c in total.__code__.co_consts if isinstance(c, type(total.__code__)))
    assert bench.code_lines(genexpr) == {genexpr.co_firstlineno}  # its own line, not those after it
    assert lines >= len(functions) * 2  # every function has at least its def line and one statement
    bench.main(["trace", "--optimizer", "GaLoreAdamW,LDAdam"])
    out = capsys.readouterr().out
    assert f"| GaLoreAdamW | {len(functions)} | {lines} |" in out and "| LDAdam |" in out
    with pytest.raises(SystemExit, match="not an optimizer class"):
        bench.main(["trace", "--optimizer", "lowrank_groups"])


def test_the_file_sizes_design_gives_are_todays():
    # DESIGN.md's size table (how the code is cut) states each file's line count
    design = open(os.path.join(ROOT, "docs", "DESIGN.md")).read()
    for name in ("lowrank_adam.py", "lowrank_engine.py", "train_tiny_llama.py"):
        with open(os.path.join(ROOT, name)) as fh:
            lines = sum(1 for _ in fh)
        assert f"| `{name}` | {lines:,} |" in design, name


@pytest.mark.parametrize("name", ["GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox"])
def test_bench_trace_meets_the_reader_path_targets(name):
    # the reader's path from step() to the update (DESIGN.md, "How the code is cut"): at most
    # 12 functions of lowrank_adam.py and 180 of their code lines, as the DESIGN table states
    functions, lines = bench.reader_path(getattr(la, name))
    design = open(os.path.join(ROOT, "docs", "DESIGN.md")).read()
    assert f"| {name} | {len(functions)} | {lines} |" in design  # the figures the docs give are today's
    assert "| target, each of ours | at most 12 | at most 180 |" in design  # the targets it states
    assert len(functions) <= 12 and lines <= 180, functions
