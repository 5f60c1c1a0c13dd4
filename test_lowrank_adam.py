"""Tests for the optimizers in lowrank_adam.py (pytest + hypothesis).
Run: ``python -m pytest -q -n auto --dist loadgroup``.

Each algorithm has a plain float64 reference written step by step in this file
(``galore_reference``, ``adaptive_reference``, ``ldadam_reference``,
``adapprox_reference``): the shortest readable version of each method, and
what the optimizers are compared with over several steps: one fixed example
each, and a hypothesis property each (``test_*_equals_its_reference_*``) over
tall, wide, square, 1×n and n×1 matrices, ranks up to and above the short
side, Adam's settings and every option. Sections, in order:

1. Shared math: the small functions every optimizer uses.
2. GaLoreAdamW against its float64 reference (every projection type and subspace).
3. The Fira-style residual (GaLoreAdamW and AdaptiveAdamW).
4. Suite-wide tests, parametrized over every optimizer the module exports:
   drop-in behaviour, state dicts and resuming, layer-wise updates, DDP and
   ZeRO-1, edge-case gradients, memory.
5. Wherever it is pasted: torch.compile (also fullgraph), FSDP1 refused, FSDP2
   (sharded, layer-wise, checkpoints), one class copied out alone, Hugging Face
   GPT-2 and packed projections, options changed between steps, the layout of
   loaded state.
6. CUDA (skipped without a GPU).
7. AdaptiveAdamW: allocation, momentum transformation, limiter, reference.
8. LDAdam: its float64 reference and the official code's conventions.
9. Adapprox: S-RSI, rank adaptation, clipping, cosine guidance, reference.

The training script, bench.py and the documentation are tested in test_train_tiny_llama.py.
"""

# What README.md promises about the library, and the test that checks it (in this
# file unless named "train::", i.e. test_train_tiny_llama.py). Kept in step by
# test_the_readme_map_names_tests_that_exist.
#
# The optimizers (table)
#   GaLoreAdamW: top-r singular vectors refreshed every T steps, one rank for all
#       test_galore_matches_reference, test_galore_equals_its_reference_at_every_shape_rank_and_option
#   refresh="randomized": a warm-started range finder
#       test_galore_randomized_refresh_matches_reference,
#       test_randomized_spectrum_is_orthonormal_exact_on_low_rank_and_signed_like_its_start
#   stagger=True: refreshes spread over the gap, about 1/T of the matrices a step
#       test_staggered_refreshes_happen_once_per_gap_at_each_offset_and_resume_exactly,
#       test_staggered_refreshes_match_the_reference_at_each_matrixs_offset
#   subspace="random" / "gha"
#       test_galore_equals_its_reference_at_every_shape_rank_and_option,
#       test_random_bases_are_orthonormal_reproducible_and_uniform,
#       test_gha_converges_to_the_top_subspace_of_a_fixed_matrix
#   residual=True: the Fira-style residual
#       test_residual_is_orthogonal_to_subspace, test_residual_limiter_bounds_growth_and_round_trips
#   AdaptiveAdamW: a global budget split greedily by gradient spectra (six metrics)
#       test_allocation_invariants, test_greedy_is_optimal_by_brute_force, test_metric_scores_on_hand_made_spectra,
#       test_adaptive_matches_reference_across_rank_changes,
#       test_adaptive_equals_its_reference_at_every_shape_rank_and_option
#   ... moments carried into the new basis by C = P_newᵀ P_old
#       test_transform_of_v_uses_the_squared_coefficients, test_transform_shapes_nonnegativity_and_containment
#   ... the residual with a norm-growth limiter by default
#       test_documented_defaults_are_the_constructors, test_adaptive_limiter_on_caps_and_off_lets_grow
#   ... stagger=True: allocation from each matrix's latest spectrum, never above the budget
#       test_adaptive_staggered_refreshes_allocate_globally_from_the_latest_spectra
#   LDAdam: a new subspace every step by one warm-started power iteration,
#   projection-aware moments, generalized error feedback
#       test_ldadam_matches_reference, test_ldadam_equals_its_reference_at_every_shape_rank_and_option,
#       test_error_feedback_identity
#   Adapprox: V divided by its row and column sums, a rank-k randomized factorization
#   in float64, k adapted to the error, update clipping
#       test_adapprox_matches_reference_across_rank_changes,
#       test_adapprox_equals_its_reference_at_every_shape_rank_cap_and_option,
#       test_adapprox_rank_adapts_within_bounds, test_adapprox_clipping_bounds_rms_and_never_enlarges,
#       test_adapprox_float64_factors_resolve_what_float32_rounds_away
#   the state per m×n matrix of each
#       test_state_bytes_per_matrix_follow_the_readme_table
#
# API
#   lowrank_groups: "attn"/"mlp" 2-D weights low-rank, the rest dense; targets=; verbose=True
#       test_lowrank_groups_convention,
#       test_lowrank_groups_takes_one_target_string_and_gives_the_dense_group_only_its_rank
#   ... Hugging Face GPT-2's Conv1D, packed in_proj_weight; GPT2LMHeadModel as is
#       test_lowrank_groups_selects_hugging_face_gpt2_conv1d_weights_and_not_its_embeddings,
#       test_lowrank_groups_selects_packed_projections, test_hugging_face_gpt2_trains_and_resumes_exactly
#   Adapprox: a group's rank caps its adaptive rank; model.parameters() factors every matrix
#       test_adapprox_takes_the_same_selection_rank_caps_and_none_is_dense,
#       test_adapprox_factors_every_matrix_with_at_least_two_rows_and_columns
#   state_bytes(opt), by_key=True; 0 and {} until the first step
#       test_state_bytes_per_matrix_follow_the_readme_table, test_state_bytes_galore_formula
#   the snippet itself runs
#       train::test_docs_python_snippets_run_on_the_models_they_name
#   group dicts copied, so one list serves several optimizers
#       test_group_dicts_are_copied_not_mutated, test_reusing_groups_for_a_second_optimizer_keeps_its_own_defaults
#   an unknown group key (misspelt, another optimizer's, AdamW's amsgrad) raises a ValueError listing the options
#       test_a_misspelt_group_option_is_refused_naming_the_known_ones,
#       test_options_of_another_optimizer_are_refused_not_ignored
#   ... torch's bookkeeping keys and the LR schedulers' pass
#       test_param_groups_take_generators_and_named_parameters,
#       test_resume_with_a_scheduler_that_writes_group_keys_is_bit_exact
#   load_state_dict refuses another optimizer's state dict, naming it
#       test_another_optimizers_state_dict_is_refused_at_load_naming_the_writer
#   drop-in: LR schedulers, closures, GradScaler, named_parameters() groups
#       test_scheduler_closure_and_set_to_none, test_a_grad_scaler_steps_every_optimizer_and_skips_an_overflowing_step,
#       test_param_groups_take_generators_and_named_parameters
#   the state loads with weights_only=True, and resuming is bit-exact
#       test_state_dict_round_trip_continues_bit_identically, test_state_loaded_in_any_layout_continues_bit_exactly
#   a bf16/fp16 model keeps float32 state (Adapprox's factors: float64)
#       test_low_precision_model_resumes_bit_exactly
#   a NaN/Inf gradient raises NonFiniteGradientError before anything changes; check_finite=False
#       test_bad_gradient_raises_and_leaves_everything_untouched, test_check_finite_is_a_group_option
#   ranks(): each matrix's current rank
#       test_adaptive_equals_its_reference_at_every_shape_rank_and_option,
#       test_adapprox_equals_its_reference_at_every_shape_rank_cap_and_option
#   layer-wise: step_parameter(p) as step() would; layerwise_hooks, gradients never coexist
#       test_layerwise_updates_equal_ordinary_steps_and_resume, test_layerwise_gradients_never_coexist_during_backward
#       test_step_parameter_after_load_state_dict_reads_the_loaded_groups
#   ... excluded: AdaptiveAdamW's allocation (the rest is the script's)
#       test_layerwise_refusals, train::test_layerwise_and_zero_refuse_what_they_cannot_do
#   DDP and ZeRO-1 with all four; each rank's shard state; AdaptiveAdamW's budget per rank
#       test_ddp_and_zero1_step_every_optimizer_with_each_ranks_state_on_its_shard
#   random sketches seeded by (seed, parameter index, step) alone; no generator state
#       test_randomized_refresh_is_independent_of_the_global_rng_and_resumes_bit_exactly,
#       test_adapprox_random_stream_is_counter_based_and_resumes_anywhere,
#       test_sketch_streams_follow_the_parameter_through_a_reordered_load
#   FSDP1 refused
#       test_fsdp1_flattened_parameters_are_refused_before_anything_changes, test_fsdp1_is_refused_under_torchrun
#   FSDP2: each matrix whole on its owner, 3 collectives a step (AdaptiveAdamW 6 at most), one
#   process's results, sharded state dicts and dcp resume exactly
#       test_fsdp2_every_optimizer_equals_one_process_with_sharded_state_and_resumes_exactly,
#       test_fsdp2_float64_weights_cross_the_ranks_unrounded,
#       test_fsdp2_even_row_counts_split_in_halves_equal_one_process
#   ... layerwise_hooks equals ordinary FSDP2 steps
#       test_fsdp2_layerwise_updates_equal_ordinary_fsdp2_steps
#   ... HSDP (a 2-D replicate x shard mesh): one process's results, every replica identical, sharded
#   state dicts resume exactly
#       test_hsdp_on_a_one_by_two_mesh_equals_one_process,
#       test_hsdp_on_a_two_by_two_mesh_equals_one_process_and_every_replica_is_identical
#   ... on GPUs, one process per GPU with NCCL (skipped without CUDA)
#       test_fsdp2_with_nccl_one_process_per_gpu_equals_one_process_and_resumes
#   ... full state dicts (full_state_dict=True) on any number of ranks or in one process
#       test_a_full_state_dict_resumes_on_another_number_of_ranks_as_the_uninterrupted_run,
#       test_fsdp2_full_state_dicts_move_between_one_process_and_two_ranks,
#       train::test_torchrun_fsdp_resumes_on_another_number_of_processes_and_says_so
#   ... refused: a sharded state dict of another world size or rank, a full state dict broadcast
#       test_fsdp2_state_dict_of_another_world_size_or_rank_is_refused_at_load_on_every_rank,
#       test_fsdp2_full_state_dict_load_is_refused_on_every_rank_and_changes_nothing
#   the table of state and peak per rank (a measurement; its command runs shrunk)
#       train::test_bench_shard_tabulates_each_ranks_state_and_peak_under_ddp_and_fsdp
#   torch.compile: eager's steps to float32 rounding, quiet graph breaks; fullgraph without the check
#       test_compiled_step_equals_the_eager_step, test_fullgraph_compile_without_the_finite_check_equals_eager
#   copying one class out: the core and the sections it uses, torch alone, bit for bit, at most 750 lines;
#   section 8's helpers need only the core
#       test_one_class_copied_out_with_the_core_alone_trains_as_the_module_does,
#       test_one_class_copied_out_defines_every_name_its_code_uses,
#       test_the_helpers_section_copied_out_with_the_core_alone_defines_every_name_its_code_uses
#   groups by hand: an integer rank is low-rank, any other group AdamW; Adapprox: rank=None is dense
#       test_one_class_copied_out_with_the_core_alone_trains_as_the_module_does, test_dense_path_matches_torch_adamw,
#       test_adapprox_takes_the_same_selection_rank_caps_and_none_is_dense
#
# Install, results and tests
#   torch 2.5 or newer (tested with 2.13.0)
#       train::test_requirements_state_a_torch_range_and_ci_installs_the_tested_version
#   the results tables and the 1B state figures (measurements; their commands run shrunk)
#       train::test_every_docs_command_runs, train::test_memory_formula_equals_state_bytes_of_a_real_step
#   the float64 references over several steps, tall, wide and square (and 1×n, n×1)
#       the four test_*_equals_its_reference_* properties above

import builtins
import copy
import dis
import io
import inspect
import logging
import math
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lowrank_adam as la
import lowrank_engine as engine

ROOT = str(Path(__file__).resolve().parent)


def is_transposed(shape):
    """GaLore's orientation rule: the short side first (m >= n -> Gᵀ)."""
    return shape[0] >= shape[1]


def orient(x, transposed):
    return (x.T if transposed else x).to(la.linalg_dtype(x.dtype))


def top_r_basis(x, rank):
    return la.gradient_spectrum(x, rank)[0]


def rms(x):
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def run_on_processes(tmp_path, source, name, nproc=2):
    """Runs ``source`` under torchrun with ``nproc`` gloo CPU processes (arguments:
    the repository root and ``tmp_path``, where each rank writes its results)."""
    script = tmp_path / name
    script.write_text(source)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(nproc), str(script), str(ROOT), str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


run_on_two_processes = run_on_processes

torch.set_num_threads(min(torch.get_num_threads(), 2))

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Every optimizer class the module exports, with test-sized hyperparameters.
OPTIMIZERS = [c for name in la.__all__ if inspect.isclass(c := getattr(la, name)) and issubclass(c, torch.optim.Optimizer)]
TEST_KWARGS = {
    "GaLoreAdamW": dict(lr=1e-2, update_proj_gap=5),
    "AdaptiveAdamW": dict(lr=1e-2, update_proj_gap=5),
    "LDAdam": dict(lr=1e-2),
    "Adapprox": dict(lr=1e-2),
}
# Extra options under which an optimizer's dense path is exactly AdamW.
ADAMW_EQUIVALENT = {"Adapprox": dict(clip_threshold=None)}


def kwargs_for(cls, **over):
    return {**TEST_KWARGS.get(cls.__name__, {}), **over}


def ids(cls):
    return cls.__name__


def mlp(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 1)).to(device, dtype)


def mlp_groups(model, rank=3, cls=None):
    """Hidden weights low-rank, everything else dense (the galore-torch convention).

    For Adapprox, which picks each matrix's rank itself, the same two groups
    without the ``rank`` key (a ``rank`` would cap its adaptive rank).
    """
    lowrank = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in lowrank)]
    if cls is la.Adapprox:
        return [{"params": rest}, {"params": lowrank}]
    return [{"params": rest}, {"params": lowrank, "rank": rank}]


def regression_data(seed=1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    return x.to(device, dtype), y.to(device, dtype)


def train(model, opt, steps, data, sched=None):
    x, y = data
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def snapshot(opt, model):
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]


def assert_same_state(a, b):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and torch.equal(v, w), name
            else:
                assert v == w, name


# =============================================================================
# Shared math
# =============================================================================

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


def matrix(shape, seed, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "rank1":
        return torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)
    return torch.randn(shape, generator=g)


@given(shape=shapes, seed=st.integers(0, 2**16), kind=st.sampled_from(["randn", "zeros", "rank1"]),
       frac=st.floats(0.01, 1.0))
@example(shape=(1, 7), seed=0, kind="randn", frac=1.0)
@example(shape=(5, 5), seed=0, kind="zeros", frac=1.0)
def test_basis_is_orthonormal_projector(shape, seed, kind, frac):
    g = matrix(shape, seed, kind)
    transposed = is_transposed(g.shape)
    x = orient(g, transposed)
    s = min(shape)
    assert x.shape == (s, max(shape))
    r = max(1, round(frac * s))
    P = top_r_basis(x, r)
    assert P.shape == (s, r) and P.dtype == torch.float32
    # Pᵀ P = I
    torch.testing.assert_close(P.T @ P, torch.eye(r), atol=1e-5, rtol=0)
    # back(project(X)) is the orthogonal projector: idempotent and norm-non-increasing
    proj = P @ (P.T @ x)
    torch.testing.assert_close(P @ (P.T @ proj), proj, atol=1e-5, rtol=1e-5)
    assert torch.linalg.norm(proj) <= torch.linalg.norm(x) * (1 + 1e-5) + 1e-6
    if r == s:  # full rank: nothing is lost
        torch.testing.assert_close(proj, x, atol=1e-5, rtol=1e-5)


def test_top_r_basis_finds_dominant_subspace():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(10, 10))
    V, _ = torch.linalg.qr(torch.randn(30, 10))
    S = torch.tensor([10.0, 8.0, 6.0] + [0.1] * 7)
    x = U @ torch.diag(S) @ V.T
    P = top_r_basis(x, 3)
    # same subspace as the first three left singular vectors
    torch.testing.assert_close(P @ P.T, U[:, :3] @ U[:, :3].T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_linear_algebra_runs_in_at_least_float32(dtype):
    x = torch.randn(6, 9).to(dtype)
    assert top_r_basis(x, 2).dtype == la.linalg_dtype(dtype)
    assert la.orthonormalize(x.T).dtype == la.linalg_dtype(dtype)
    assert la.linalg_dtype(dtype) in (torch.float32, torch.float64)


def test_orthonormalize_rank_deficient_is_finite():
    q = la.orthonormalize(torch.zeros(7, 3))
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.T @ q, torch.eye(3), atol=1e-5, rtol=0)



@pytest.mark.parametrize("x", [torch.zeros(6, 3, dtype=torch.float64),
                               torch.tensor([[1.0, 0, 2], [0, 0, -1], [3, 0, 1], [0, 0, 4]], dtype=torch.float64)],
                         ids=["zero", "zero-column"])
def test_orthonormalize_signed_keeps_orthonormal_columns_for_rank_deficient_input(x):
    # a zero pivot (diag(R) = 0) has no sign to fix: its column must stay a unit
    # vector, not be multiplied by sign(0) = 0
    q = la.orthonormalize_signed(x)
    torch.testing.assert_close(q.T @ q, torch.eye(x.shape[1], dtype=x.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(q @ (q.T @ x), x, atol=1e-12, rtol=0)  # spans x's range
    r = q.T @ x  # x = Q R with R upper triangular and diag(R) >= 0
    torch.testing.assert_close(r, torch.triu(r), atol=1e-12, rtol=0)
    assert (torch.diagonal(r) >= -1e-12).all()


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (7, 7)], ids=["tall", "wide", "square"])
def test_orientation_gives_state_of_shape_r_by_long_side(shape):
    p = nn.Parameter(torch.randn(shape))
    opt = la.GaLoreAdamW([{"params": [p], "rank": 3}])
    p.grad = torch.randn(shape)
    opt.step()
    st_ = opt.state[p]
    assert st_["exp_avg"].shape == (3, max(shape))
    assert st_["exp_avg_sq"].shape == (3, max(shape))
    assert st_["P"].shape == (min(shape), 3)


def test_norm_growth_limiter_bounds_growth():
    x = torch.ones(4, 4) * 10
    prev = torch.tensor(1.0)
    new = la.norm_growth_limit_(x, prev, 1.01)
    assert math.isclose(rms(x).item(), 1.01, rel_tol=1e-5) and math.isclose(new.item(), 1.01, rel_tol=1e-5)
    # no history (prev = 0): untouched
    y = torch.ones(3, 3) * 5
    la.norm_growth_limit_(y, torch.tensor(0.0), 1.01)
    assert torch.equal(y, torch.ones(3, 3) * 5)
    # shrinking is never limited
    z = torch.ones(2, 2) * 0.5
    la.norm_growth_limit_(z, torch.tensor(1.0), 1.01)
    assert torch.equal(z, torch.ones(2, 2) * 0.5)


def test_the_residual_in_the_parameters_layout_is_the_transpose():
    torch.manual_seed(0)
    x = torch.randn(5, 9)
    P = top_r_basis(x, 2)
    r, n = P.T @ x, torch.randn(2, 9)
    torch.testing.assert_close(la.orthogonal_residual(x, P, r, n, transposed=True),
                               la.orthogonal_residual(x, P, r, n).T)


# =============================================================================
# GaLoreAdamW against an independent reference
# =============================================================================


def left_singular_vectors(X):
    """U of X = U Σ Vᵀ, from the SVD of the tall orientation (a square X counts
    as wide), as the optimizers compute it: GaLore does not rotate its moments
    when P changes, so the arbitrary signs of the columns must agree."""
    if X.shape[0] > X.shape[1]:
        return torch.linalg.svd(X, full_matrices=False).U
    return torch.linalg.svd(X.T, full_matrices=False).Vh.T


# Which side of G (m×n) the projection compresses, per GaLore's proj_type:
# "left" means P is m×r and R = Pᵀ G; "right" means P is n×r and R = G P.
PROJECTION_SIDE = {
    "std": lambda m, n: "right" if m >= n else "left",  # the short side
    "reverse_std": lambda m, n: "left" if m >= n else "right",  # the long side
    "left": lambda m, n: "left",
    "right": lambda m, n: "right",
}


def rms64(x):
    return (x.square().mean()).sqrt().item() if x.numel() else 0.0


def limit_growth(x, prev, gamma):
    """Norm-growth limiter: scale x so RMS(x) <= γ·prev (no limit when prev = 0); the
    history is the new RMS, or prev when x is all zero."""
    cur = rms64(x)
    if gamma is not None and prev > 0 and cur > gamma * prev:
        x = x * (gamma * prev / cur)
    return x, (rms64(x) if cur > 0 else prev)


def fira_residual(X, P, R, N):
    """S = (X - P R) diag(φ), φ_j = ‖N[:, j]‖ / (‖R[:, j]‖ + 1e-8 · ‖X‖/√l): one φ per column,
    the guard relative to the RMS column norm of X (l columns), and φ = 0 for X = 0."""
    guard = 1e-8 * torch.linalg.norm(X) / X.shape[1] ** 0.5
    denom = torch.linalg.norm(R, dim=0) + guard
    phi = torch.where(denom > 0, torch.linalg.norm(N, dim=0) / denom, 0.0)
    return (X - P @ R) * phi[None, :]


def signed_qr(x):
    """Orthonormal Q of x with diag(R) >= 0 (no arbitrary sign flips)."""
    q, r = torch.linalg.qr(x)
    return q * torch.sign(torch.diagonal(r))


def range_finder(X, P_prev, width, seed, t, iters, index=0):
    """The randomized refresh in float64: Q = [P_prev, Ω] (Ω Gaussian, drawn
    from stream_seed(stream_seed(seed, index), t), topping P_prev up to ``width``
    columns), ``iters`` rounds of Q ← orth(X Xᵀ Q), then the SVD of Qᵀ X.
    Returns (U, S) with U's leading columns signed to agree with P_prev's."""
    k = min(width, X.shape[0])
    gen = torch.Generator().manual_seed(la.stream_seed(la.stream_seed(seed, index), t))
    Omega = torch.randn(X.shape[0], k - P_prev[:, :k].shape[1], generator=gen, dtype=X.dtype)
    Q = torch.cat([P_prev[:, :k], Omega], dim=1)
    for _ in range(iters):
        Q = torch.linalg.qr(X @ (X.T @ Q)).Q
    UB, S, _ = torch.linalg.svd(Q.T @ X, full_matrices=False)
    U = Q @ UB
    j = min(P_prev.shape[1], k)
    U[:, :j] *= torch.where((U[:, :j] * P_prev[:, :j]).sum(0) < 0, -1.0, 1.0)
    return U, S


def galore_reference(W0, grads, rank, gap, lr, betas, eps, wd, scale, proj_type="std", residual=False,
                     gamma=None, subspace="svd", gha_lr=0.1, seed=0, refresh="svd", refresh_iters=1, offset=0,
                     index=0):
    """GaLore's algorithm box, written independently in float64, plus the
    Fira-style residual with its norm-growth limiter, the random / GHA
    subspaces and the randomized refresh. The random numbers are drawn from
    generators seeded with stream_seed(stream_seed(seed, index), t), index
    the parameter's position in the optimizer: an input, like the gradients.
    ``offset``: refreshes at t = 1, then t ≡ 1 + offset (mod gap) (a
    staggered schedule)."""
    W = W0.clone()
    side = PROJECTION_SIDE[proj_type](*W.shape)
    M = V = P = P_ref = None
    prev_rms = 0.0
    again = False  # the last refresh met an all-zero gradient: refresh at the next step too
    for t, G in enumerate(grads, start=1):
        X = G if side == "left" else G.T  # the rows of X are what P spans
        r = min(rank, *W.shape)  # a rank above the short side is clamped to it (whichever side P spans)
        if t == 1 or (t - 1 - offset) % gap == 0 or again:
            retry, again, P_new = again, False, None
            if subspace == "random":  # a fresh uniformly random basis
                gen = torch.Generator().manual_seed(la.stream_seed(la.stream_seed(seed, index), t))
                P_new = signed_qr(torch.randn(X.shape[0], r, generator=gen, dtype=W.dtype))
            elif subspace == "gha" and P is not None and not retry:  # the basis GHA has tracked
                P_new = P
            elif not X.any():  # a zero gradient has no subspace: keep P (coordinate axes at first), try again
                again = True
                P_new = torch.eye(X.shape[0], r, dtype=X.dtype) if P is None else None
            elif refresh == "randomized" and P is not None:  # warm-started range finder (step 1: the SVD)
                P_new = range_finder(X, P, r + 8, seed, t, refresh_iters, index)[0][:, :r]
            else:  # the top-r left singular vectors, each signed to agree with the previous basis
                P_new = left_singular_vectors(X)[:, :r]
                if P is not None:
                    P_new = P_new * torch.where((P_new * P).sum(0) < 0, -1.0, 1.0)
            if P_new is not None:
                if subspace != "svd" and M is not None:  # the moments follow the basis
                    C = P_new.T @ (P_ref if subspace == "gha" else P)
                    M, V = C @ M, (C * C) @ V
                P = P_ref = P_new
        R = P.T @ X
        if M is None:
            M, V = torch.zeros_like(R), torch.zeros_like(R)
        M = betas[0] * M + (1 - betas[0]) * R
        V = betas[1] * V + (1 - betas[1]) * R * R
        N = (M / (1 - betas[0] ** t)) / ((V / (1 - betas[1] ** t)).sqrt() + eps)
        D = scale * P @ N
        if residual:
            S, prev_rms = limit_growth(fira_residual(X, P, R, N), prev_rms, gamma)
            D = D + S
        W = W * (1 - lr * wd) - lr * (D if side == "left" else D.T)
        if subspace == "gha" and X.any():  # Sanger's rule on C = X Xᵀ / ‖X‖², then QR (X = 0: P stays)
            Cov = X @ X.T / (X * X).sum()
            P = signed_qr(P + gha_lr * (Cov @ P - P @ torch.triu(P.T @ Cov @ P)))
    return W


def gapped_grads(shape, steps, seed=0):
    """float64 gradients with a clear spectral gap, so the SVD basis is well
    defined (sign aside), and a dominant direction that changes over time."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        low = torch.outer(torch.randn(shape[0], generator=g, dtype=torch.float64),
                          torch.randn(shape[1], generator=g, dtype=torch.float64))
        out.append(torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 + (t % 3 + 1) * low)
    return out


SHAPES = {"tall": (9, 4), "wide": (4, 9), "square": (6, 6)}


# -- what the properties below range over: every kind of shape, rank and Adam setting --

SHAPE_KINDS = ("tall", "wide", "square", "1×n", "n×1")


def between(lo, hi):
    """An integer in [lo, hi], uniformly (``st.integers`` favours the ends)."""
    return st.sampled_from(range(lo, hi + 1))


@st.composite
def shapes_of_every_kind(draw, max_side=12, kinds=SHAPE_KINDS):
    """A tall, wide, square, 1×n or n×1 matrix shape (drawn from ``kinds``), sides 1..max_side."""
    kind = draw(st.sampled_from(kinds))
    if kind in ("1×n", "n×1"):
        n = draw(between(1, max_side))
        return (1, n) if kind == "1×n" else (n, 1)
    short = draw(between(1, max_side - (kind != "square")))
    if kind == "square":
        return (short, short)
    long = draw(between(short + 1, max_side))
    return (long, short) if kind == "tall" else (short, long)


def ranks_for(short):
    """A rank below the short side, equal to it, or above it (then clamped to it)."""
    return st.one_of(between(1, short), st.just(short), st.just(short + 2))


ADAM_OPTIONS = st.fixed_dictionaries(dict(
    lr=st.floats(1e-3, 0.1), betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.999)),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]), weight_decay=st.floats(0.0, 0.2)))


def separated_grads(shape, steps, seed, zero=()):
    """float64 gradients U diag(s) Vᵀ with fresh random singular vectors at each
    step and singular values that fall by a factor ρ·u from one to the next (u
    in [0.9, 1] for each value). Each step's spectrum is flat (ρ in [0.85, 0.95]),
    steep (ρ in [0.5, 0.6]) or a spike (flat, its first value 10× higher):
    every gap is wide, so the top-r basis is well defined (sign aside) at every
    rank r, and an allocation moves from step to step. The steps listed in
    ``zero`` (0-based) get all-zero gradients."""
    g = torch.Generator().manual_seed(seed)
    q = min(shape)
    out = []
    for t in range(steps):
        U = torch.linalg.qr(torch.randn(shape[0], q, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(shape[1], q, generator=g, dtype=torch.float64)).Q
        kind, rho, scale = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        s = (1 + scale) * torch.cumprod(((0.5 if kind < 1 / 3 else 0.85) + 0.1 * rho)
                                        * (0.9 + 0.1 * torch.rand(q, generator=g, dtype=torch.float64)), 0)
        if kind > 2 / 3:
            s[0] *= 10
        out.append(torch.zeros(shape, dtype=torch.float64) if t in zero else U @ torch.diag(s) @ V.T)
    return out


def test_galore_matches_reference():
    """One fixed example of how GaLoreAdamW is compared with its reference (the
    property below ranges over every shape and option): a tall matrix at rank 2,
    the residual on, refreshes at steps 1, 4 and 7."""
    shape, proj_type, residual = SHAPES["tall"], "std", True
    torch.manual_seed(0)
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = gapped_grads(shape, 7)
    kw = dict(rank=2, gap=3, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, scale=0.5)
    expected = galore_reference(W0, grads, **kw, proj_type=proj_type, residual=residual,
                                gamma=1.01 if residual else None)
    p = nn.Parameter(W0.clone())
    opt = la.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 3, "scale": 0.5, "proj_type": proj_type,
                           "residual": residual}], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)
    side = PROJECTION_SIDE[proj_type](*shape)
    assert opt.state[p]["P"].shape == (shape[0] if side == "left" else shape[1], 2)


def residual_vanishes_then_returns(shape, rank, proj_type):
    """Whether a rank-``rank`` P can span all of a full-rank gradient X while
    spanning fewer than all of X's rows (X's rank is the short side; P spans
    the long side under ``reverse_std``, ``left`` or ``right``). Then the
    residual X - P R is rounding noise at a refresh, or exactly 0, and whole
    at the next step; the limiter, whose RMS history 0 means "no limit", caps
    that next residual to γ times the noise, or not at all, as the rounding
    falls (and uncapped, a column where R is 0 while N is not gets φ = ‖N_j‖/δ):
    the same step computed in another order ends elsewhere. The properties
    turn the limiter off there (its cases at every other shape are covered)."""
    short = min(shape)
    rows = shape[0] if PROJECTION_SIDE[proj_type](*shape) == "left" else shape[1]
    return min(rank, short) == short < rows


@st.composite
def galore_cases(draw):
    """Options of one GaLoreAdamW matrix: its shape and rank, the matrix's
    position ``index`` among the optimizer's parameters (it seeds the random
    streams and, with ``stagger``, picks the refresh offset), steps with
    all-zero gradients, and every group option the reference covers."""
    shape = draw(shapes_of_every_kind())
    steps = draw(st.integers(4, 9))
    return dict(shape=shape, rank=draw(ranks_for(min(shape))), steps=steps, index=draw(st.integers(0, 3)),
                zero_steps=draw(st.sets(st.integers(0, steps - 1), max_size=2)),
                update_proj_gap=draw(st.integers(1, 4)), scale=draw(st.floats(0.1, 1.0)),
                proj_type=draw(st.sampled_from(["std", "reverse_std", "left", "right"])),
                residual=draw(st.booleans()), norm_growth_limit=draw(st.sampled_from([None, 1.01, 1.5])),
                subspace=draw(st.sampled_from(["svd", "random", "gha"])), gha_lr=draw(st.floats(0.05, 1.0)),
                refresh=draw(st.sampled_from(["svd", "randomized"])), refresh_iters=draw(st.integers(1, 2)),
                stagger=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=300)
@given(case=galore_cases(), adam=ADAM_OPTIONS, data_seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_galore_equals_its_reference_at_every_shape_rank_and_option(case, adam, data_seed):
    """GaLoreAdamW equals ``galore_reference`` step after step, whatever the
    shape, rank, gap, Adam setting, residual, subspace, refresh and stagger."""
    c = dict(case)
    shape, rank, index, steps = c.pop("shape"), c.pop("rank"), c.pop("index"), c.pop("steps")
    if c["residual"] and residual_vanishes_then_returns(shape, rank, c["proj_type"]):
        c["norm_growth_limit"] = None
    g = torch.Generator().manual_seed(data_seed)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = separated_grads(shape, steps, data_seed, zero=c.pop("zero_steps"))
    expected = galore_reference(
        W0, grads, rank, c["update_proj_gap"], adam["lr"], adam["betas"], adam["eps"], adam["weight_decay"],
        c["scale"], proj_type=c["proj_type"], residual=c["residual"], gamma=c["norm_growth_limit"],
        subspace=c["subspace"], gha_lr=c["gha_lr"], seed=c["seed"], refresh=c["refresh"],
        refresh_iters=c["refresh_iters"], offset=index % c["update_proj_gap"] if c["stagger"] else 0, index=index)
    p = nn.Parameter(W0.clone())
    before = [nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(index)]  # no gradients: never stepped
    opt = la.GaLoreAdamW([{"params": before}] * bool(before) + [{"params": [p], "rank": rank, **c}], **adam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that a rank above the short side is clamped
        for G in grads:
            p.grad = G.clone()
            opt.step()
            assert opt.ranks() == [min(rank, *shape)]
    torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)


def test_galore_randomized_refresh_matches_reference():
    # (30, 12) at rank 2: the sketch (2 + 8 columns) is narrower than the short side, by more than in
    # most of the property's examples. A parameter without a gradient is listed first: the sketches
    # are those of the matrix's position, 1
    shape, residual, iters = (30, 12), True, 2
    torch.manual_seed(0)
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = gapped_grads(shape, 8)
    kw = dict(rank=2, gap=3, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, scale=0.5)
    expected = galore_reference(W0, grads, **kw, residual=residual, gamma=1.01 if residual else None,
                                refresh="randomized", refresh_iters=iters, seed=3, index=1)
    p = nn.Parameter(W0.clone())
    opt = la.GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(3, dtype=torch.float64))]},
                          {"params": [p], "rank": 2, "update_proj_gap": 3, "scale": 0.5, "residual": residual}],
                         lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, refresh="randomized",
                         refresh_iters=iters, seed=3)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)
    # the exact SVD's run differs: the refreshes at steps 4 and 7 were sketched
    exact = galore_reference(W0, grads, **kw, residual=residual, gamma=1.01 if residual else None)
    assert not torch.allclose(exact, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("subspace, refresh", [("svd", "svd"), ("gha", "svd")])
def test_staggered_refreshes_match_the_reference_at_each_matrixs_offset(subspace, refresh):
    """With ``stagger``, matrix i (its parameter index) refreshes at step 1, then
    at t ≡ 1 + (i mod T) (mod T): tall, wide and square matrices at indices 0,
    1 and 2 of one group with T = 3 equal the float64 reference run at those
    offsets (the property above: one matrix at any index, every option)."""
    g = torch.Generator().manual_seed(0)
    W0s = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in SHAPES.values()]
    grads = [gapped_grads(shape, 9, seed=i) for i, shape in enumerate(SHAPES.values())]
    kw = dict(rank=2, gap=3, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, scale=0.5)
    ps = [nn.Parameter(W.clone()) for W in W0s]
    opt = la.GaLoreAdamW([{"params": ps, "rank": 2, "update_proj_gap": 3, "scale": 0.5, "residual": True,
                           "subspace": subspace, "gha_lr": 0.3, "stagger": True}], lr=0.05, betas=(0.9, 0.99),
                         eps=1e-8, weight_decay=0.1, refresh=refresh, seed=4)
    for t in range(9):
        for p, gs in zip(ps, grads):
            p.grad = gs[t].clone()
        opt.step()
    for i, (p, W0, gs) in enumerate(zip(ps, W0s, grads)):
        expected = galore_reference(W0, gs, **kw, residual=True, gamma=1.01, subspace=subspace, gha_lr=0.3,
                                    refresh=refresh, seed=4, offset=i % 3, index=i)
        torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)
    if subspace == "svd":  # the offsets matter: matrix 1 run at offset 0 ends elsewhere
        other = galore_reference(W0s[1], grads[1], **kw, residual=True, gamma=1.01, refresh=refresh, seed=4, index=1)
        assert not torch.allclose(ps[1].detach(), other, atol=1e-6)


def test_staggered_refreshes_happen_once_per_gap_at_each_offset_and_resume_exactly(tmp_path):
    """Seven matrices, T = 3: after step 1, every step refreshes the matrices
    whose index i has t ≡ 1 + (i mod 3) (mod 3), each once per gap; a run
    saved mid-gap and loaded into a fresh optimizer continues bit for bit."""
    def build(seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(*[nn.Linear(5, 5, bias=False) for _ in range(7)])
        return model, la.GaLoreAdamW([{"params": list(model.parameters()), "rank": 2, "update_proj_gap": 3,
                                       "stagger": True}], lr=1e-2)

    model, opt = build()
    refreshed, new_basis = [], la.GaLoreAdamW._refresh
    def spy(self, p, X, state, group, index, t):
        refreshed.append((t, index))
        return new_basis(self, p, X, state, group, index, t)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(5, 5, generator=g) for _ in range(7)] for _ in range(10)]

    def run(model, opt, steps):
        for gs in steps:
            for p, grad in zip(model.parameters(), gs):
                p.grad = grad.clone()
            opt.step()

    la.GaLoreAdamW._refresh = spy
    try:
        run(model, opt, grads[:7])
    finally:
        la.GaLoreAdamW._refresh = new_basis
    by_step = {t: sorted(i for s, i in refreshed if s == t) for t in range(1, 8)}
    assert by_step[1] == list(range(7))  # every matrix's first basis
    for t in range(2, 8):
        assert by_step[t] == [i for i in range(7) if (t - 1 - i % 3) % 3 == 0], t
    for i in range(7):  # once in every gap of T = 3 steps after the first
        assert [t for t in range(2, 8) if i in by_step[t]] in ([2, 5], [3, 6], [4, 7])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    model2, opt2 = build(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    run(model, opt, grads[7:])
    run(model2, opt2, grads[7:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_adaptive_staggered_refreshes_allocate_globally_from_the_latest_spectra(tmp_path):
    """AdaptiveAdamW with ``stagger``: after step 1 (every matrix), each step
    refreshes the matrices at their offsets, each once per gap; a refreshed
    matrix takes the rank that the greedy allocation gives it over every
    matrix's latest spectrum (its own fresh one, the others' kept from their
    last refresh) with all of B; a run saved mid-gap resumes bit for bit."""
    shapes = [(10, 14), (12, 8), (9, 9), (6, 15), (14, 11)]

    def build(seed=0):
        torch.manual_seed(seed)
        ps = [nn.Parameter(torch.randn(s)) for s in shapes]
        return ps, la.AdaptiveAdamW([{"params": ps, "rank": 3, "update_proj_gap": 3, "stagger": True}], lr=1e-2)

    g = torch.Generator().manual_seed(2)
    grads = []
    for t in range(10):  # each matrix with a spectrum of its own, changing over time
        grads.append([torch.randn(s, generator=g) + (t % 4 + 1) * (i + 1) * torch.outer(
            torch.randn(s[0], generator=g), torch.randn(s[1], generator=g)) for i, s in enumerate(shapes)])

    def step(ps, opt, gs):
        for p, grad in zip(ps, gs):
            p.grad = grad.clone()
        opt.step()

    ps, opt = build()
    shrunk = []
    for t in range(1, 8):
        kept = [opt.state[p].get("spectrum") for p in ps]
        before = [dict(opt.state[p]) for p in ps]
        step(ps, opt, grads[t - 1])
        refreshed = [i for i, p in enumerate(ps) if opt.state[p]["spectrum"] is not kept[i]]
        assert refreshed == ([0, 1, 2, 3, 4] if t == 1 else [i for i in range(5) if (t - 1 - i % 3) % 3 == 0]), t
        assert sum(opt.ranks()) <= 15  # never more than the budget B = 5 · 3
        if t > 1:  # the allocation: fresh spectra of the refreshed, kept ones of the others
            spectra = [opt.state[p]["spectrum"] if i in refreshed else before[i]["spectrum"] for i, p in enumerate(ps)]
            energy = [(opt.state[p] if i in refreshed else before[i])["energy"].item() for i, p in enumerate(ps)]
            want = la.allocate_ranks([s.tolist() for s in spectra], 15, [min(s) for s in shapes],
                                     "explained_variance", energy)
            for i, p in enumerate(ps):  # the refreshed take it; the others shrink to it at once, or wait to grow
                assert opt.ranks()[i] == (want[i] if i in refreshed else min(want[i], before[i]["rank"])), (t, i)
                if i not in refreshed and want[i] < before[i]["rank"]:  # its leading directions and moment rows
                    shrunk.append((t, i))
                    assert torch.equal(opt.state[p]["P"], before[i]["P"][:, :want[i]])
                    assert opt.state[p]["exp_avg"].shape[0] == opt.state[p]["exp_avg_sq"].shape[0] == want[i]
            X = [orient(ps[i].grad, is_transposed(shapes[i])) for i in refreshed]
            for i, x in zip(refreshed, X):  # the kept spectrum is this step's gradient's
                torch.testing.assert_close(opt.state[ps[i]]["spectrum"], torch.linalg.svdvals(x))
    assert len(set(opt.ranks())) > 1 and shrunk  # the ranks moved apart, some without a refresh of their own
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    ps2, opt2 = build(seed=5)
    for p, q in zip(ps, ps2):
        q.data.copy_(p.data)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for gs in grads[7:]:
        step(ps, opt, gs)
        step(ps2, opt2, gs)
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2)) and opt.ranks() == opt2.ranks()


def test_adaptive_stagger_must_agree_across_allocating_groups():
    a, b = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(7, 5))
    with pytest.raises(ValueError, match="Invalid stagger"):
        la.AdaptiveAdamW([{"params": [a], "rank": 2, "stagger": True}, {"params": [b], "rank": 2}])
    la.AdaptiveAdamW([{"params": [a], "rank": 2, "stagger": True}, {"params": [b], "rank": 2, "allocate": False}])


def test_randomized_spectrum_is_orthonormal_exact_on_low_rank_and_signed_like_its_start():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 90, generator=g, dtype=torch.float64)
    U_svd, S_svd, _ = torch.linalg.svd(low, full_matrices=False)
    warm = -U_svd[:, :3]  # a start with the "wrong" signs
    U, S = la.randomized_spectrum(low, 8, warm, torch.Generator().manual_seed(1))
    assert U.shape == (40, 8) and S.shape == (8,)
    torch.testing.assert_close(U.T @ U, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(S[:5], S_svd[:5], atol=1e-9, rtol=1e-12)  # rank 5 <= 8 columns: exact
    assert S[5:].abs().max() < 1e-9
    torch.testing.assert_close(U[:, :5] @ U[:, :5].T, U_svd[:, :5] @ U_svd[:, :5].T, atol=1e-10, rtol=0)
    assert ((U[:, :3] * warm).sum(0) > 0.99).all()  # signed like the start, column by column
    # a full-rank gradient: the values are those of X on a subspace, so never above X's
    x = torch.randn(30, 70, generator=g)
    U, S = la.randomized_spectrum(x, 6, None, torch.Generator().manual_seed(2))
    assert (S <= torch.linalg.svdvals(x)[:6] * (1 + 1e-5)).all()
    # zero and float32-range-extreme gradients stay finite
    for scale in (0.0, 1e-30, 1e30):
        U, S = la.randomized_spectrum(x * scale, 6, U, torch.Generator().manual_seed(3))
        assert torch.isfinite(U).all() and torch.isfinite(S).all()


def test_randomized_spectrum_takes_the_first_width_columns_of_its_start_and_without_iterations_orthonormalizes():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 50, generator=g, dtype=torch.float64)
    warm = la.orthonormalize(torch.randn(20, 12, generator=g, dtype=torch.float64))
    # a start wider than the sketch: only its first `width` columns are used
    U, S = la.randomized_spectrum(x, 8, warm, torch.Generator().manual_seed(1))
    U8, S8 = la.randomized_spectrum(x, 8, warm[:, :8], torch.Generator().manual_seed(1))
    assert U.shape == (20, 8) and S.shape == (8,) and torch.equal(U, U8) and torch.equal(S, S8)
    # power_iters=0: Q = orth([P_prev, Ω]), then the SVD of Qᵀ X (float64 reference)
    for start in (None, warm[:, :3]):
        U, S = la.randomized_spectrum(x, 8, start, torch.Generator().manual_seed(2), power_iters=0)
        prev = torch.zeros(20, 0, dtype=torch.float64) if start is None else start
        Omega = torch.randn(20, 8 - prev.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        Q = torch.linalg.qr(torch.cat([prev, Omega], dim=1)).Q
        torch.testing.assert_close(U.T @ U, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(U @ U.T, Q @ Q.T, atol=1e-12, rtol=0)
        torch.testing.assert_close(S, torch.linalg.svdvals(Q.T @ x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("subspace", ["random", "gha"])
def test_galore_subspaces_with_a_rank_above_the_short_side_match_reference(subspace):
    # rank 6 on a 9×4 matrix is rank 4 (clamped): the random basis is drawn as a
    # 4×4 Gaussian, not 4×6, and the moments have 4 rows
    shape = SHAPES["tall"]
    torch.manual_seed(0)
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = gapped_grads(shape, 5)
    kw = dict(rank=6, gap=2, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, scale=0.5)
    expected = galore_reference(W0, grads, **kw, subspace=subspace, gha_lr=0.3, seed=5)
    p = nn.Parameter(W0.clone())
    opt = la.GaLoreAdamW([{"params": [p], "rank": 6, "update_proj_gap": 2, "scale": 0.5, "subspace": subspace,
                           "gha_lr": 0.3, "seed": 5}], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the clamp warning
        for g in grads:
            p.grad = g.clone()
            opt.step()
    torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)
    assert opt.state[p]["P"].shape == (4, 4) and opt.state[p]["exp_avg"].shape == (4, 9)


def test_random_subspace_stream_lives_in_the_parameter_state():
    # like Adapprox's: a resume with the groups in another order continues the same stream
    a, b = nn.Parameter(torch.randn(6, 9)), nn.Parameter(torch.randn(7, 5))
    opt = la.GaLoreAdamW([{"params": [a, b], "rank": 2, "subspace": "random", "update_proj_gap": 2}])
    a.grad, b.grad = torch.randn(6, 9), torch.randn(7, 5)
    opt.step()
    assert opt.state[a]["seed"] == la.stream_seed(0, 0) and opt.state[b]["seed"] == la.stream_seed(0, 1)


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_randomized_refresh_is_independent_of_the_global_rng_and_resumes_bit_exactly(cls, tmp_path):
    # every DDP rank builds its own optimizer: the sketches must not depend on
    # anything but (seed, parameter index, step); a resume continues exactly
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 10), (10, 24)]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(8)]
    W0 = [torch.randn(s, generator=g) for s in shapes]

    def run(steps, params=None, opt=None, global_seed=0):
        torch.manual_seed(global_seed)  # the global RNG differs between "ranks"
        if opt is None:
            params = [nn.Parameter(w.clone()) for w in W0]
            opt = cls([{"params": params, "rank": 3, "update_proj_gap": 2}], lr=1e-2, refresh="randomized", seed=7)
        for gs in steps:
            for p, gr in zip(params, gs):
                p.grad = gr.clone()
            opt.step()
        return params, opt

    full, opt_full = run(grads)
    other, _ = run(grads, global_seed=123)
    assert all(torch.equal(a, b) for a, b in zip(full, other))
    half, opt = run(grads[:5])
    torch.save({"opt": opt.state_dict(), "w": [p.detach() for p in half]}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    params = [nn.Parameter(w.clone()) for w in saved["w"]]
    opt = cls([{"params": params, "rank": 3, "update_proj_gap": 2}], lr=1e-2, refresh="randomized", seed=7)
    opt.load_state_dict(saved["opt"])
    resumed, opt = run(grads[5:], params, opt, global_seed=99)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
    assert_same_state(opt.state_dict(), opt_full.state_dict())
    for p in resumed:  # the bases stay orthonormal
        P = opt.state[p]["P"]
        torch.testing.assert_close(P.T @ P, torch.eye(P.shape[1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_refresh_options_are_checked(cls):
    p = nn.Parameter(torch.randn(6, 4))
    for bad in ({"refresh": "rsvd"}, {"refresh_iters": 0}, {"refresh_iters": 1.5}, {"refresh_iters": True}):
        with pytest.raises(ValueError, match="Invalid refresh"):
            cls([{"params": [p], "rank": 2, **bad}])


def test_random_bases_are_orthonormal_reproducible_and_uniform():
    draws = [la.random_basis(6, 2, torch.Generator().manual_seed(i), torch.float64) for i in range(2000)]
    for P in draws[:5]:
        torch.testing.assert_close(P.T @ P, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(draws[3], la.random_basis(6, 2, torch.Generator().manual_seed(3), torch.float64))
    # a uniformly distributed subspace has E[P Pᵀ] = (r/s) I, and a Haar basis E[P] = 0
    torch.testing.assert_close(torch.stack([P @ P.T for P in draws]).mean(0), torch.eye(6, dtype=torch.float64) / 3,
                               atol=0.03, rtol=0)
    assert torch.stack(draws).mean(0).abs().max() < 0.05


def test_gha_converges_to_the_top_subspace_of_a_fixed_matrix():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64)).Q
    Wm = torch.linalg.qr(torch.randn(30, 10, generator=g, dtype=torch.float64)).Q
    X = U @ torch.diag(torch.tensor([8.0, 6.0, 4.0] + [1.0] * 7, dtype=torch.float64)) @ Wm.T
    P = la.random_basis(10, 3, torch.Generator().manual_seed(1), torch.float64)
    for _ in range(300):
        P = la.gha_step(P, X, P.T @ X, lr=0.5)
    # Sanger's rule finds the eigenvectors themselves, in order (up to sign), hence the SVD's top-3 subspace
    torch.testing.assert_close((P.T @ U[:, :3]).abs(), torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(P.T @ P, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    # the step does not depend on the gradient's scale, and a zero gradient changes nothing
    torch.testing.assert_close(la.gha_step(P, 1e3 * X, P.T @ (1e3 * X), 0.5), la.gha_step(P, X, P.T @ X, 0.5))
    assert torch.equal(la.gha_step(P, 0 * X, P.T @ (0 * X), 0.5), P)



def test_gha_step_is_scale_free_down_to_small_float32_gradients():
    # the ‖X‖² normalization must hold for gradients far below 1 in float32 (the
    # dtype the optimizer runs it in): only an exactly zero gradient is special
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 20, generator=g)
    P = la.random_basis(8, 3, torch.Generator().manual_seed(1))
    expected = la.gha_step(P, X, P.T @ X, 0.5)
    assert not torch.allclose(expected, P, atol=1e-3)  # the step does move P
    for c in (1e-3, 1e-6, 1e-9):
        torch.testing.assert_close(la.gha_step(P, c * X, P.T @ (c * X), 0.5), expected, atol=1e-5, rtol=1e-4)


def test_gha_lr_and_seed_are_validated():
    p = nn.Parameter(torch.randn(6, 9))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="Invalid gha_lr"):
            la.GaLoreAdamW([{"params": [p], "rank": 2, "subspace": "gha", "gha_lr": bad}])
    la.GaLoreAdamW([{"params": [p], "rank": 2, "subspace": "gha", "gha_lr": 1.0}])  # the upper end is allowed
    for bad in (True, 1.5, "0"):
        with pytest.raises(ValueError, match="Invalid seed"):
            la.GaLoreAdamW([{"params": [p], "rank": 2, "subspace": "random", "seed": bad}])
        with pytest.raises(ValueError, match="Invalid seed"):
            la.Adapprox([p], seed=bad)


def remap_state(sd, order):
    """A state dict for an optimizer whose parameters are those of ``sd`` in
    ``order`` (one group): what a load by parameter name does."""
    sd = copy.deepcopy(sd)
    sd["state"] = {new: sd["state"][old] for new, old in enumerate(order) if old in sd["state"]}
    return sd


@pytest.mark.parametrize("cls, options", [(la.GaLoreAdamW, dict(subspace="random", update_proj_gap=1)),
                                          (la.GaLoreAdamW, dict(refresh="randomized", update_proj_gap=2)),
                                          (la.AdaptiveAdamW, dict(refresh="randomized", update_proj_gap=2)),
                                          (la.Adapprox, dict(rank_init=2))], ids=["random", "galore-randomized",
                                                                                  "adaptive-randomized", "Adapprox"])
def test_sketch_streams_follow_the_parameter_through_a_reordered_load(cls, options):
    # The seed of a parameter's random draws lives in its state, so a resume into
    # an optimizer that lists the parameters in another order (a load by name)
    # continues every parameter's own stream, not the stream of its new position.
    # The randomized refresh's first sketch comes after the resume (steps 3 and 5):
    # its seed is in the state from the first refresh, an exact SVD, on.
    g = torch.Generator().manual_seed(0)
    shapes_ = [(10, 14), (9, 6)]
    ws = [torch.randn(s, generator=g) for s in shapes_]
    grads = [[torch.randn(s, generator=g) for s in shapes_] for _ in range(5)]
    group = lambda ps: [{"params": ps, **({} if cls is la.Adapprox else {"rank": 2}), **options}]
    a = [nn.Parameter(w.clone()) for w in ws]
    opt = cls(group(a), lr=1e-2)
    for gs in grads[:2]:
        for p, gr in zip(a, gs):
            p.grad = gr.clone()
        opt.step()
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt2 = cls(group(b[::-1]), lr=1e-2)  # the same parameters, listed the other way round
    opt2.load_state_dict(remap_state(opt.state_dict(), [1, 0]))
    for gs in grads[2:]:
        for p, q, gr in zip(a, b, gs):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("subspace", ["random", "gha"])
def test_galore_subspaces_resume_exactly_and_are_refused_by_adaptive(subspace, tmp_path):
    data = regression_data()
    model = mlp()
    groups = mlp_groups(model)
    groups[1]["subspace"] = subspace
    opt = la.GaLoreAdamW(groups, lr=1e-2, update_proj_gap=3)
    train(model, opt, 7, data)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2 = mlp(seed=9)
    model2.load_state_dict(ckpt["model"])
    groups2 = mlp_groups(model2)
    groups2[1]["subspace"] = subspace
    opt2 = la.GaLoreAdamW(groups2, lr=1e-2, update_proj_gap=3)
    opt2.load_state_dict(ckpt["opt"])
    assert train(model, opt, 8, data) == train(model2, opt2, 8, data)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    with pytest.raises(ValueError, match="AdaptiveAdamW has no group option 'subspace'.*spectra"):
        la.AdaptiveAdamW(groups)
    with pytest.raises(ValueError, match="Invalid subspace"):
        la.GaLoreAdamW(mlp_groups(model), subspace="pca")


def test_residual_limiter_acts_in_the_reference_run():
    # the residual reference above is only meaningful if its limiter fires
    shape = SHAPES["tall"]
    W0, grads = torch.randn(shape, dtype=torch.float64), gapped_grads(shape, 7)
    kw = dict(rank=2, gap=3, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, scale=0.5, residual=True)
    assert not torch.allclose(galore_reference(W0, grads, **kw, gamma=1.01),
                              galore_reference(W0, grads, **kw, gamma=None))


def test_galore_keeps_moments_on_refresh():
    p = nn.Parameter(torch.randn(6, 10))
    opt = la.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2}])
    for i in range(2):
        p.grad = torch.randn(6, 10)
        opt.step()
    m_before = opt.state[p]["exp_avg"].clone()
    P_before = opt.state[p]["P"].clone()
    p.grad = torch.randn(6, 10)
    opt.step()  # step 3: refresh
    assert not torch.allclose(opt.state[p]["P"], P_before)
    # the moment was updated with the new R, not rotated/reset: m = β1 m_before + (1-β1) R
    R = opt.state[p]["P"].T @ p.grad
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.9 * m_before + 0.1 * R)


def energy_kept(P, X):
    """Share of ‖X‖²_F that the basis P keeps: ‖Pᵀ X‖² / ‖X‖²."""
    return ((P.T @ X).square().sum() / X.square().sum()).item()


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_a_state_dict_taken_before_the_first_step_does_not_pick_the_basis(cls):
    """torch's ``get_optimizer_state_dict`` on a fresh optimizer steps once with
    zero gradients and lr 0 to create the state: the first real step must still
    find the basis and the ranks a run without that call finds."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    data = regression_data()

    def run(state_dict_first):
        model = mlp()
        opt = cls(mlp_groups(model, rank=3), lr=1e-2, update_proj_gap=5)
        if state_dict_first:
            get_optimizer_state_dict(model, opt)
        train(model, opt, 1, data)
        return model, opt

    (model, plain), (model2, early) = run(False), run(True)
    assert early.ranks() == plain.ranks()
    for p, q in [(model[0].weight, model2[0].weight), (model[2].weight, model2[2].weight)]:
        X = orient(p.grad, is_transposed(p.shape))
        assert energy_kept(early.state[q]["P"], X) == pytest.approx(energy_kept(plain.state[p]["P"], X), abs=1e-5)
        assert energy_kept(early.state[q]["P"], X) > 0.5  # not the coordinate axes of the zero step
        assert early.state[q]["refresh_again"] == 0


@pytest.mark.parametrize("refresh, subspace", [("svd", "svd"), ("randomized", "svd"), ("svd", "gha")])
def test_an_all_zero_gradient_at_a_refresh_keeps_the_basis_and_refreshes_at_the_next_step(refresh, subspace):
    """Zero gradients at step 1 and at the refresh of step 4: no basis is read
    off them, the refresh is done at the step after (``refresh_again`` in the
    state), as the reference does (the GaLoreAdamW property draws zero steps too)."""
    shape = SHAPES["wide"]
    torch.manual_seed(0)
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = gapped_grads(shape, 9)
    grads[0], grads[3] = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    kw = dict(rank=2, gap=3, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, scale=0.5)
    expected = galore_reference(W0, grads, **kw, residual=True, gamma=1.01, subspace=subspace, gha_lr=0.3,
                                refresh=refresh, seed=2)
    p = nn.Parameter(W0.clone())
    opt = la.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 3, "scale": 0.5, "residual": True,
                           "subspace": subspace, "gha_lr": 0.3}], lr=0.05, betas=(0.9, 0.99), eps=1e-8,
                         weight_decay=0.1, refresh=refresh, seed=2)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        assert opt.state[p]["refresh_again"] == int(t in (1, 4) and not (subspace == "gha" and t == 4))
    torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)


def test_adaptive_matrix_with_a_zero_gradient_at_a_refresh_keeps_its_rank_and_the_budget_holds():
    """One matrix's gradient is zero at a refresh: it keeps P and its rank, the
    others share the rest of the budget, and it is refreshed at the next step."""
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(10, 12, generator=g)) for _ in range(3)]
    opt = la.AdaptiveAdamW([{"params": ps, "rank": 4}], lr=1e-2, update_proj_gap=3)
    for t in range(1, 6):
        for i, p in enumerate(ps):  # matrix 0: one dominant direction; the others: full spectra
            low = torch.outer(torch.randn(10, generator=g), torch.randn(12, generator=g)) * 5
            p.grad = torch.randn(10, 12, generator=g) + (low if i == 0 else 0)
        if t == 4:
            ps[1].grad.zero_()
            before = (opt.ranks()[1], opt.state[ps[1]]["P"].clone())
        opt.step()
        assert sum(opt.ranks()) == 12
        if t == 4:
            assert opt.ranks()[1] == before[0] and torch.equal(opt.state[ps[1]]["P"], before[1])
            assert opt.state[ps[1]]["refresh_again"] == 1
    X = ps[1].grad  # step 5: matrix 1 (10×12: P spans its rows) refreshed alone, from its own gradient
    assert opt.state[ps[1]]["refresh_again"] == 0
    assert energy_kept(opt.state[ps[1]]["P"], X) == pytest.approx(
        energy_kept(top_r_basis(X, opt.ranks()[1]), X), abs=1e-6)


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_the_same_run_in_float32_and_float64_agrees_across_refreshes(cls):
    """The SVD's column signs depend on the dtype; each new column is signed like
    the previous basis, so moments kept across a refresh keep their direction
    and a float32 run follows the float64 one (without it they end far apart)."""
    grads = gapped_grads((12, 7), 12, seed=3)
    opts = dict(rank=3, update_proj_gap=3) if cls is la.GaLoreAdamW else dict(rank=3, update_proj_gap=3,
                                                                              transform_momentum=False)
    out = []
    for dtype in (torch.float32, torch.float64):
        p = nn.Parameter(torch.randn(12, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype))
        opt = cls([{"params": [p], **opts}], lr=0.05)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        out.append(p.detach().double())
    start = torch.randn(12, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (out[0] - out[1]).abs().max() < 1e-4 * (out[1] - start).abs().max()


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
@pytest.mark.parametrize("exponent", [-40, -20, 20, 40])
def test_the_residual_is_free_of_the_gradients_scale(cls, exponent):
    """With eps negligible (1e-30), gradients scaled by 2^k move the weights as
    the unscaled ones do: the residual's guard scales with the gradient."""
    grads = gapped_grads((9, 14), 7, seed=4)

    def run(scale):
        p = nn.Parameter(torch.randn(9, 14, generator=torch.Generator().manual_seed(0)))
        opt = cls([{"params": [p], "rank": 2, "residual": True}], lr=1e-2, eps=1e-30, update_proj_gap=3)
        for g in grads:
            p.grad = (g * scale).float()
            opt.step()
        return p.detach()

    ref = run(1.0)
    assert (run(2.0 ** exponent) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_rank_larger_than_matrix_is_clamped_with_one_warning():
    # warned when the group joins, once for the group, not at every step
    a, b = nn.Parameter(torch.randn(3, 8)), nn.Parameter(torch.randn(8, 2))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = la.GaLoreAdamW([{"params": [a, b], "rank": 5}])
        a.grad, b.grad = torch.randn(3, 8), torch.randn(8, 2)
        opt.step()
    assert len([x for x in w if "exceeds min(m, n)" in str(x.message)]) == 1
    assert opt.ranks() == [3, 2]
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


# =============================================================================
# The Fira-style residual (GaLoreAdamW and AdaptiveAdamW)
# =============================================================================


def test_residual_is_orthogonal_to_subspace():
    torch.manual_seed(0)
    x = torch.randn(5, 9)
    P = top_r_basis(x, 2)
    r = P.T @ x
    n = torch.randn(2, 9)
    s = la.orthogonal_residual(x, P, r, n)
    torch.testing.assert_close(P.T @ s, torch.zeros(2, 9), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_residual_changes_nothing_at_full_rank(cls):
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5, 9))
    b = nn.Parameter(a.detach().clone())
    opt_a = cls([{"params": [a], "rank": 5, "residual": False}], lr=1e-2)
    opt_b = cls([{"params": [b], "rank": 5, "residual": True}], lr=1e-2)
    for _ in range(5):
        g = torch.randn(5, 9)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def residual_growth(cls, gamma, steps=5):
    """Largest step-to-step growth of RMS(S), S read off the parameter change."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(6, 12, generator=g)
    p = nn.Parameter(torch.zeros(6, 12))
    opt = cls([{"params": [p], "rank": 2, "residual": True, "norm_growth_limit": gamma}], lr=1.0)
    sizes = []
    for i in range(steps):
        p.grad = grad * (1 if i == 0 else -1) + 0.1 * torch.randn(6, 12, generator=g)
        before = p.detach().clone()
        opt.step()
        P = opt.state[p]["P"]  # (6, 2): the (6, 12) matrix is not transposed
        delta = p.detach() - before
        sizes.append(rms(delta - P @ (P.T @ delta)).item())  # = lr · RMS(S)
    return max(b / a for a, b in zip(sizes[1:], sizes[2:])), opt, p


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_residual_limiter_bounds_growth_and_round_trips(cls, tmp_path):
    free, _, _ = residual_growth(cls, None)
    assert free > 1.5  # without the limiter the residual jumps after the sign flip
    limited, opt, p = residual_growth(cls, 1.01)
    assert limited <= 1.01 * (1 + 1e-4)
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    q = nn.Parameter(p.detach().clone())
    opt2 = cls([{"params": [q], "rank": 2, "residual": True}], lr=1.0)
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    grad = torch.randn(6, 12)
    p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_an_all_zero_gradient_keeps_the_limiters_history(cls):
    # A zero gradient has a zero residual: the history stays the last nonzero RMS, so the next residual
    # is still limited against it (a history of 0 let it through unlimited: 1.04 times the first here).
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(6, 12))
    opt = cls([{"params": [p], "rank": 2, "residual": True, "update_proj_gap": 100}], lr=1.0)
    sizes = []
    for scale in (1.0, 0.0, 1e3):
        p.grad = scale * torch.randn(6, 12, generator=g)
        before = p.detach().clone()
        opt.step()
        P, delta = opt.state[p]["P"], p.detach() - before
        sizes.append(rms(delta - P @ (P.T @ delta)).item())  # = lr · RMS(S)
    assert sizes[0] > 0.1 and sizes[1] < 1e-6  # (the subspace step alone: zero up to rounding)
    assert sizes[2] <= 1.01 * sizes[0] * (1 + 1e-4), sizes


def test_adaptive_refresh_keep_rounds_a_fractional_bound_up(monkeypatch):
    # ⌈refresh_keep × rank⌉ vectors are held: 1.5 × 3 = 4.5 -> 5 (not 4), which is
    # all that B - L + 1 = 5 allows, so the matrix allocated 5 needs no second SVD
    a, b = nn.Parameter(torch.randn(8, 20)), nn.Parameter(torch.randn(8, 20))
    opt = la.AdaptiveAdamW([{"params": [a, b], "rank": 3}], lr=1e-2, refresh_keep=1.5)
    held = []  # the columns of U of each SVD (a second SVD of a matrix would add an entry)
    spectrum = la.gradient_spectrum
    monkeypatch.setattr(la, "gradient_spectrum", lambda *args: held.append((u := spectrum(*args))[0].shape[1]) or u)
    g = torch.Generator().manual_seed(0)
    a.grad = torch.randn(8, 20, generator=g)
    b.grad = torch.outer(torch.randn(8, generator=g), torch.randn(20, generator=g))  # rank 1: a gets the rest
    opt.step()
    assert opt.ranks() == [5, 1]
    assert held == [5, 5]


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_norm_growth_limit_of_one_is_allowed_and_never_lets_the_residual_grow(cls):
    # γ = 1 is the documented lower end ("use >= 1"): the limited residual's RMS never increases
    p = nn.Parameter(torch.zeros(6, 12))
    opt = cls([{"params": [p], "rank": 2, "residual": True}], lr=1.0, norm_growth_limit=1.0)
    with pytest.raises(ValueError, match="Invalid norm_growth_limit"):
        cls([{"params": [p], "rank": 2, "residual": True}], norm_growth_limit=0.999)
    g = torch.Generator().manual_seed(0)
    sizes = []
    for i in range(6):
        p.grad = torch.randn(6, 12, generator=g) * (1 + i)
        opt.step()
        sizes.append(opt.state[p]["rms"].item())
    assert all(b <= a * (1 + 1e-6) for a, b in zip(sizes, sizes[1:]))


# =============================================================================
# Suite-wide tests, every optimizer
# =============================================================================


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
@given(shape=st.one_of(st.tuples(st.integers(1, 12)), shapes), lr=st.floats(1e-4, 1e-1),
       b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.9999), eps=st.floats(1e-10, 1e-3), wd=st.floats(0.0, 0.5),
       seed=st.integers(0, 1000))
def test_dense_path_matches_torch_adamw(cls, shape, lr, b1, b2, eps, wd, seed):
    if cls.__name__ == "Adapprox":  # factors every matrix with min(m, n) >= 2; its exact-rank test covers those
        assume(len(shape) == 1 or min(shape) < 2)
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(12)]
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    hp = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ref = torch.optim.AdamW([a], foreach=False, **hp)
    opt = cls([b], **hp, **ADAMW_EQUIVALENT.get(cls.__name__, {}))
    for gr in grads:
        a.grad, b.grad = gr.clone(), gr.clone()
        ref.step()
        opt.step()
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_each_dense_group_keeps_its_own_hyperparameters(cls):
    # two groups without rank, each its own lr, betas, eps and weight decay: each
    # must follow torch.optim.AdamW with its own, not the first dense group's
    g = torch.Generator().manual_seed(0)
    shape = (7,)
    w0s = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    hps = [dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0),
           dict(lr=3e-1, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.2)]
    ours = [nn.Parameter(w.clone()) for w in w0s]
    refs = [nn.Parameter(w.clone()) for w in w0s]
    opt = cls([{"params": [p], "rank": None, **hp} for p, hp in zip(ours, hps)],
              **ADAMW_EQUIVALENT.get(cls.__name__, {}))
    torch_opts = [torch.optim.AdamW([p], foreach=False, **hp) for p, hp in zip(refs, hps)]
    for _ in range(4):
        for p, q in zip(ours, refs):
            p.grad = torch.randn(shape, generator=g, dtype=torch.float64)
            q.grad = p.grad.clone()
        opt.step()
        for o in torch_opts:
            o.step()
    for p, q in zip(ours, refs):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_converges_on_tiny_regression(cls):
    model = mlp()
    data = regression_data()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    losses = train(model, opt, 150, data)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_state_dict_round_trip_continues_bit_identically(cls, tmp_path):
    data = regression_data()
    model = mlp()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    train(model, opt, 7, data)  # crosses a subspace refresh for the periodic methods
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2 = mlp(seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = cls(mlp_groups(model2, cls=cls), **kwargs_for(cls))
    opt2.load_state_dict(ckpt["opt"])
    l1 = train(model, opt, 9, data)
    l2 = train(model2, opt2, 9, data)
    assert l1 == l2
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert_same_state(opt.state_dict(), opt2.state_dict())


def train_scaled(model, opt, steps, data, loss_scale):
    """``train`` with the loss multiplied by ``loss_scale`` (small gradients)."""
    x, y = data
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (nn.functional.mse_loss(model(x), y) * loss_scale).backward()
        opt.step()


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_model_resumes_bit_exactly(cls, dtype, tmp_path):
    # Small gradients (loss × 1e-4): in fp16, (1-β2)·g² underflows to 0, so a
    # state rounded to the parameter's dtype on load would be visibly wrong.
    data = regression_data(dtype=dtype)
    model = mlp(dtype=dtype)
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    train_scaled(model, opt, 7, data, 1e-4)  # crosses a subspace refresh for the periodic methods
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2 = mlp(seed=123, dtype=dtype)
    model2.load_state_dict(ckpt["model"])
    opt2 = cls(mlp_groups(model2, cls=cls), **kwargs_for(cls))
    opt2.load_state_dict(ckpt["opt"])
    # every state tensor is the saved one, value and dtype (float32 state for a low-precision model)
    assert_same_state(opt.state_dict(), opt2.state_dict())
    assert any(v.dtype == torch.float32 for st_ in opt2.state.values() for v in st_.values()
               if isinstance(v, torch.Tensor))
    train_scaled(model, opt, 6, data, 1e-4)
    train_scaled(model2, opt2, 6, data, 1e-4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert_same_state(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_scheduler_closure_and_set_to_none(cls):
    model = mlp()
    x, y = regression_data()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    first = None
    for _ in range(20):
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        first = first if first is not None else loss.item()
        sched.step()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    assert nn.functional.mse_loss(model(x), y).item() < first
    # a step with no gradients at all changes nothing
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def schedulers_that_write_group_keys(opt):
    """Every kind of torch LR scheduler that writes keys of its own into the
    param groups (``initial_lr``, ``max_lr``, ``min_lr``, ``max_momentum``,
    ``base_momentum``), alone and inside the chained and sequential ones."""
    sch = torch.optim.lr_scheduler
    return {
        "OneCycleLR": lambda: sch.OneCycleLR(opt, max_lr=1e-2, total_steps=40),
        "CyclicLR": lambda: sch.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3),
        "ChainedScheduler": lambda: sch.ChainedScheduler([sch.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3),
                                                          sch.ExponentialLR(opt, gamma=0.95)]),
        "SequentialLR": lambda: sch.SequentialLR(opt, [sch.LinearLR(opt, start_factor=0.5, total_iters=4),
                                                       sch.OneCycleLR(opt, max_lr=1e-2, total_steps=40)],
                                                 milestones=[4]),
    }


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("kind", ["OneCycleLR", "CyclicLR", "ChainedScheduler", "SequentialLR"])
def test_resume_with_a_scheduler_that_writes_group_keys_is_bit_exact(cls, kind, tmp_path):
    """torch's schedulers add keys to every param group; the state dict that
    holds them loads into a fresh optimizer, and the run continues bit for bit."""
    data = regression_data()

    def build(seed):
        model = mlp(seed=seed)
        opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SequentialLR's own deprecation notes
            return model, opt, schedulers_that_write_group_keys(opt)[kind]()

    model, opt, sched = build(0)
    train(model, opt, 7, data, sched)  # crosses a subspace refresh for the periodic methods
    assert {"initial_lr"} < set(opt.param_groups[0])  # the scheduler wrote keys of its own
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
               tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model2, opt2, sched2 = build(123)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert train(model, opt, 6, data, sched) == train(model2, opt2, 6, data, sched2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert_same_state(opt.state_dict(), opt2.state_dict())
    # a misspelt option is still refused, and nothing is loaded
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["max_lrr"] = 1e-2
    fresh = cls(mlp_groups(mlp(), cls=cls), **kwargs_for(cls))
    with pytest.raises(ValueError, match="max_lrr.*nothing was loaded"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_param_groups_take_generators_and_named_parameters(cls):
    model = mlp()
    opt = cls([{"params": model.parameters()}], **kwargs_for(cls))  # a generator inside a group dict
    assert len(opt.param_groups[0]["params"]) == 6
    named = cls(model.named_parameters(), **kwargs_for(cls))  # torch's (name, tensor) pairs
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    with pytest.raises(TypeError, match="not a set"):
        cls([{"params": set(model.parameters())}])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_group_dicts_are_copied_not_mutated(cls):
    model = mlp()
    groups = mlp_groups(model, cls=cls)
    before = [dict(g) for g in groups]
    cls(groups, **kwargs_for(cls))
    assert [dict(g) for g in groups] == before  # torch.optim would have written its defaults into them


def test_reusing_groups_for_a_second_optimizer_keeps_its_own_defaults():
    # the README pattern: one lowrank_groups list, two optimizers
    model = mlp()
    groups = la.lowrank_groups(nn.ModuleDict({"mlp": model}), rank=3, targets=("mlp",))
    assert la.GaLoreAdamW(groups).param_groups[-1]["residual"] is False
    assert la.AdaptiveAdamW(groups).param_groups[-1]["residual"] is True


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_unknown_constructor_options_raise_type_error(cls):
    for bad in ("amsgrad", "maximize", "foreach", "correct_bias"):
        with pytest.raises(TypeError):
            cls(mlp().parameters(), **{bad: True})


@pytest.mark.parametrize("cls,key,value,words", [
    (la.LDAdam, "scale", 0.25, "no GaLore scale"),
    (la.LDAdam, "update_proj_gap", 200, "every step"),
    (la.LDAdam, "residual", True, "an option of AdaptiveAdamW, GaLoreAdamW"),
    (la.LDAdam, "error_dtype", torch.bfloat16, "constructor argument"),
    (la.Adapprox, "update_proj_gap", 10, "remove it from the group"),
    (la.GaLoreAdamW, "rank_metric", "gap", "an option of AdaptiveAdamW"),
    (la.GaLoreAdamW, "rho", 0.9, "an option of LDAdam"),
    (la.AdaptiveAdamW, "k_max_frac", 0.5, "an option of Adapprox"),
])
def test_options_of_another_optimizer_are_refused_not_ignored(cls, key, value, words):
    groups = mlp_groups(mlp(), cls=cls)
    with pytest.raises(ValueError, match=f"{cls.__name__} has no group option '{key}'.*{words}"):
        cls([groups[0], {**groups[1], key: value}])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_a_misspelt_group_option_is_refused_naming_the_known_ones(cls):
    # a key no optimizer knows would otherwise be ignored in silence (rnk=3 for rank=3)
    groups = mlp_groups(mlp(), cls=cls)
    with pytest.raises(ValueError, match=rf"{cls.__name__} has no group option 'rnk' \(unknown\).*"
                                         r"Its group options: .*\bbetas, check_finite, .*\beps, .*\blr\b"):
        cls([groups[0], {**groups[1], "rnk": 3}])
    with pytest.raises(ValueError, match="amsgrad"):  # torch AdamW's options are not ours either
        cls([{**groups[0], "amsgrad": True}, groups[1]])
    # torch's bookkeeping keys pass: named parameters and a scheduler's initial_lr
    model = mlp()
    opt = cls([{"params": list(model.named_parameters()), "initial_lr": 0.5}], **kwargs_for(cls))
    assert opt.param_groups[0]["initial_lr"] == 0.5


WRITERS = {**{c.__name__: c for c in OPTIMIZERS}, "AdamW": torch.optim.AdamW}


@pytest.mark.parametrize("reader", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_another_optimizers_state_dict_is_refused_at_load_naming_the_writer(reader, writer):
    model = mlp()
    cls = WRITERS[writer]
    if cls is torch.optim.AdamW:
        opt = cls(model.parameters(), lr=1e-2)
    else:
        opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    train(model, opt, 2, regression_data())
    sd = copy.deepcopy(opt.state_dict())
    target = reader(mlp_groups(model, cls=reader) if cls is not torch.optim.AdamW else model.parameters(),
                    **kwargs_for(reader))
    if cls is reader:
        target.load_state_dict(sd)  # its own: loads
        return
    with pytest.raises(ValueError, match=f"written by {writer if writer != 'AdamW' else 'another optimizer'}"
                                         ".*nothing was loaded"):
        target.load_state_dict(sd)
    assert len(target.state) == 0


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_a_state_dict_without_a_newer_option_loads_with_its_default(cls):
    model = mlp()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    data = regression_data()
    train(model, opt, 3, data)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["check_finite"]  # as if written before the option existed
    model2 = mlp(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = cls(mlp_groups(model2, cls=cls), **kwargs_for(cls))
    opt2.load_state_dict(sd)
    assert all(g["check_finite"] is True for g in opt2.param_groups)
    assert train(model, opt, 2, data) == train(model2, opt2, 2, data)



@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_a_rejected_param_group_never_half_joins(cls):
    model = mlp()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    extra = nn.Parameter(torch.randn(5, 7))
    for bad in ({"params": [extra], "lr": -1.0}, {"params": [extra], "rho": 0.5, "k_max_frac": 0.5}):
        with pytest.raises(ValueError, match="Invalid learning rate|has no group option"):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == 2 and all(p is not extra for g in opt.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="Complex parameters are not supported"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))]})
    with pytest.raises(ValueError, match="Complex parameters are not supported"):
        cls([nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    assert len(opt.param_groups) == 2
    train(model, opt, 2, regression_data())  # still a working optimizer


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_load_state_dict_holds_the_given_tensors_not_copies(cls, dtype):
    # like torch's own: loading a large checkpoint must not hold its state twice
    model = mlp(dtype=dtype)
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    train(model, opt, 3, regression_data(dtype=dtype))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2 = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    opt2.load_state_dict(sd)
    params = [p for g in opt2.param_groups for p in g["params"]]
    checked = 0
    for i, st_ in sd["state"].items():
        for name, v in st_.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert opt2.state[params[i]][name].data_ptr() == v.data_ptr(), name
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_a_state_dict_with_old_generator_states_warns_and_still_loads(cls):
    model = mlp()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    train(model, opt, 2, regression_data())
    sd = {**copy.deepcopy(opt.state_dict()), "extra": {"generators": [torch.Generator().get_state()]}}
    opt2 = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    with pytest.warns(UserWarning, match="generator states of an older version"):
        opt2.load_state_dict(sd)
    assert_same_state(opt.state_dict(), opt2.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a current state dict loads silently
        cls(mlp_groups(model, cls=cls), **kwargs_for(cls)).load_state_dict(opt.state_dict())


def test_documented_defaults_are_the_constructors():
    # the defaults chosen by measurement and stated in the docstrings / docs/RESULTS.md
    documented = {
        la.GaLoreAdamW: dict(update_proj_gap=200, scale=0.25, proj_type="std", residual=False, subspace="svd",
                             gha_lr=0.5, norm_growth_limit=1.01),
        la.AdaptiveAdamW: dict(update_proj_gap=200, scale=0.25, residual=True, refresh_keep=2.0,
                               rank_metric="explained_variance", transform_momentum=True, norm_growth_limit=1.01),
        la.LDAdam: dict(lr=1e-3, betas=(0.908, 0.99), rho=0.908, error_feedback=True, proj_method="power"),
        la.Adapprox: dict(k_max_frac=0.25, err_tol=0.5, row_col_scaling=True, nonneg="abs", warm_start=True, power_iters=1,
                          oversample=5, clip_threshold=1.0, cosine_guidance=False),
    }
    for cls, expected in documented.items():
        defaults = cls([nn.Parameter(torch.randn(4, 4))]).defaults
        assert {k: defaults[k] for k in expected} == expected, cls.__name__


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_distributed_checkpoint_helpers_round_trip(cls):
    # torch.distributed.checkpoint's helpers (FSDP2 / torchtitan style) keep only
    # per-parameter state and param groups: the optimizers must keep everything there.
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    data = regression_data()
    model = mlp()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    train(model, opt, 7, data)
    sd = copy.deepcopy(get_optimizer_state_dict(model, opt))  # as if written to disk: no aliasing
    model2 = mlp(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = cls(mlp_groups(model2, cls=cls), **kwargs_for(cls, seed=3) if cls is la.Adapprox else kwargs_for(cls))
    set_optimizer_state_dict(model2, opt2, sd)
    assert train(model, opt, 6, data) == train(model2, opt2, 6, data)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("cls, stagger", [(c, False) for c in OPTIMIZERS] + [(la.GaLoreAdamW, True)],
                         ids=[c.__name__ for c in OPTIMIZERS] + ["GaLoreAdamW-stagger"])
def test_layerwise_updates_equal_ordinary_steps_and_resume(cls, stagger, tmp_path):
    # every parameter stepped inside backward (its gradient freed at once)
    # gives the same weights and state as optimizer.step() after backward
    data = regression_data()
    extra = dict(allocate=False) if cls is la.AdaptiveAdamW else {}
    extra.update(dict(stagger=True) if stagger else {})
    ordinary, layerwise = mlp(), mlp()
    opt_a = cls(mlp_groups(ordinary, cls=cls), **kwargs_for(cls, **extra))
    opt_b = cls(mlp_groups(layerwise, cls=cls), **kwargs_for(cls, **extra))
    handles = engine.layerwise_hooks(opt_b)
    x, y = data
    for step in range(8):  # crosses the refreshes of the periodic methods
        opt_a.zero_grad(set_to_none=True)
        nn.functional.mse_loss(ordinary(x), y).backward()
        opt_a.step()
        nn.functional.mse_loss(layerwise(x), y).backward()
        assert all(p.grad is None for p in layerwise.parameters())  # no gradient outlives its update
        if step == 3:  # resume the layer-wise run from a checkpoint
            torch.save(opt_b.state_dict(), tmp_path / "o.pt")
            opt_b = cls(mlp_groups(layerwise, cls=cls), **kwargs_for(cls, **extra))
            opt_b.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
            for h in handles:
                h.remove()
            handles = engine.layerwise_hooks(opt_b)
    assert all(torch.equal(p, q) for p, q in zip(ordinary.parameters(), layerwise.parameters()))
    assert_same_state(opt_a.state_dict(), opt_b.state_dict())


def test_dense_path_is_torch_adamw_bit_for_bit_even_beside_a_bf16_parameter():
    torch.manual_seed(0)
    a32, b32, b16 = nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(64, 64)), nn.Parameter(
        torch.randn(4).bfloat16())
    b32.data.copy_(a32)
    ref = torch.optim.AdamW([a32], lr=1e-3, weight_decay=0.1, foreach=False)
    opt = la.GaLoreAdamW([b32, b16], lr=1e-3, weight_decay=0.1)  # one group, mixed dtypes
    for _ in range(20):
        g = torch.randn(64, 64)
        a32.grad, b32.grad, b16.grad = g.clone(), g.clone(), torch.randn(4).bfloat16()
        ref.step()
        opt.step()
    assert torch.equal(a32, b32)


def test_layerwise_steps_count_for_lr_schedulers():
    model = mlp()
    opt = la.GaLoreAdamW(mlp_groups(model), lr=1e-2)
    engine.layerwise_hooks(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would be raised
        for _ in range(2):
            nn.functional.mse_loss(model(regression_data()[0]), regression_data()[1]).backward()
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-3)


@pytest.mark.parametrize("cls", [la.Adapprox, la.GaLoreAdamW], ids=ids)
def test_a_random_stream_is_keyed_by_the_parameter_position_not_by_who_has_a_gradient(cls):
    # a parameter's sketches come from (seed, its index among all parameters, t):
    # a neighbour without a gradient this step must not shift that index
    runs = []
    for with_neighbour_grad in (False, True):
        g = torch.Generator().manual_seed(0)
        a, b = nn.Parameter(torch.randn(12, 10, generator=g)), nn.Parameter(torch.randn(12, 10, generator=g))
        extra = {"subspace": "random", "rank": 3} if cls is la.GaLoreAdamW else {}
        opt = cls([{"params": [a, b], **extra}], lr=1e-2)
        for _ in range(3):
            a.grad, b.grad = torch.randn(12, 10, generator=g), torch.randn(12, 10, generator=g)
            if not with_neighbour_grad:
                a.grad = None
            opt.step()
        runs.append(b.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_layerwise_gradients_never_coexist_during_backward():
    # GaLore's memory trick: when a parameter's gradient is ready, every earlier
    # one has already been used and freed, so at most one full gradient exists
    # (the ordinary loop holds them all by the end of backward)
    for layerwise in (False, True):
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
        params = list(model.parameters())
        most = []
        for p in params:  # registered first, so it runs before the layer-wise update of p
            p.register_post_accumulate_grad_hook(lambda _: most.append(sum(q.grad is not None for q in params)))
        opt = la.GaLoreAdamW([{"params": params[::2], "rank": 4}, {"params": params[1::2]}], lr=1e-3)
        if layerwise:
            engine.layerwise_hooks(opt)
        model(torch.randn(8, 16)).square().mean().backward()
        assert max(most) == (1 if layerwise else len(params)) and len(most) == len(params)


def test_layerwise_refusals():
    model = mlp()
    with pytest.raises(TypeError, match="needs an optimizer of this module"):
        engine.layerwise_hooks(torch.optim.AdamW(model.parameters()))
    with pytest.raises(RuntimeError, match="AdaptiveAdamW cannot update one parameter at a time"):
        engine.layerwise_hooks(la.AdaptiveAdamW(mlp_groups(model)))
    with pytest.raises(RuntimeError, match="AdaptiveAdamW cannot update one parameter at a time"):
        la.AdaptiveAdamW(mlp_groups(model)).step_parameter(model[0].weight)
    # a frozen parameter takes no hook (torch refuses one) and is simply never stepped
    model[0].bias.requires_grad_(False)
    opt = la.GaLoreAdamW(model.parameters(), lr=1e-2)
    assert len(engine.layerwise_hooks(opt)) == 5
    before = model[0].bias.detach().clone()
    nn.functional.mse_loss(model(regression_data()[0]), regression_data()[1]).backward()
    assert torch.equal(model[0].bias, before) and not torch.equal(model[0].weight, mlp()[0].weight)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        la.GaLoreAdamW(mlp().parameters()).step_parameter(model[0].weight)



@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_step_parameter_refuses_a_non_finite_gradient_and_skips_a_missing_one(cls):
    model = mlp()
    extra = dict(allocate=False) if cls is la.AdaptiveAdamW else {}
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls, **extra))
    engine.layerwise_hooks(opt)
    x, y = regression_data()
    nn.functional.mse_loss(model(x), y).backward()
    sd, params = snapshot(opt, model)
    w = model[0].weight  # low-rank (or factored) matrix
    opt.step_parameter(w)  # no gradient (freed by its hook): nothing happens
    w.grad = torch.full_like(w, float("nan"))
    with pytest.raises(la.NonFiniteGradientError, match=r"shape \(16, 8\)"):
        opt.step_parameter(w)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert_same_state(sd, opt.state_dict())


def test_step_parameter_reaches_a_parameter_of_a_group_added_later():
    model, late = mlp(), nn.Parameter(torch.randn(5, 7))
    opt = la.GaLoreAdamW(mlp_groups(model), lr=1e-2)
    engine.layerwise_hooks(opt)
    nn.functional.mse_loss(model(regression_data()[0]), regression_data()[1]).backward()
    opt.add_param_group({"params": [late], "rank": 2})
    ref = nn.Parameter(late.detach().clone())
    ref_opt = la.GaLoreAdamW([{"params": [ref], "rank": 2}], lr=1e-2)
    late.grad = ref.grad = torch.randn(5, 7)
    opt.step_parameter(late)
    ref_opt.step()
    assert torch.equal(late, ref) and opt.state[late]["step"] == 1


INVALID = [("lr", -1.0, "learning rate"), ("eps", 0.0, "epsilon"), ("eps", -1e-8, "epsilon"),
           ("betas", (1.0, 0.999), "beta parameter at index 0"), ("betas", (0.9, -0.1), "beta parameter at index 1"),
           ("weight_decay", -0.1, "weight_decay")]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("key,value,words", INVALID)
def test_invalid_hyperparameters_raise(cls, key, value, words):
    model = mlp()
    with pytest.raises(ValueError, match=f"Invalid {words}"):
        cls(mlp_groups(model, cls=cls), **kwargs_for(cls, **{key: value}))
    # the same check applies per group
    with pytest.raises(ValueError, match=f"Invalid {words}"):
        groups = mlp_groups(model, cls=cls)
        groups[1][key] = value
        cls(groups, **kwargs_for(cls))


@pytest.mark.parametrize("cls", [c for c in OPTIMIZERS if c.__name__ != "Adapprox"], ids=ids)
@pytest.mark.parametrize("key,value,words", [("rank", 0, "rank"), ("rank", 2.5, "rank"),
                                             ("update_proj_gap", 0, "update_proj_gap"),
                                             ("proj_type", "diagonal", "proj_type")])
def test_invalid_lowrank_group_options_raise(cls, key, value, words):
    model = mlp()
    groups = mlp_groups(model, cls=cls)
    groups[1][key] = value
    honoured = key == "rank" or key in inspect.signature(cls).parameters
    expected = f"Invalid {words}" if honoured else f"has no group option '{key}'"
    with pytest.raises(ValueError, match=expected):
        cls(groups, **kwargs_for(cls))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_non_2d_tensor_in_rank_group_raises(cls):
    model = mlp()
    with pytest.raises(ValueError, match=r"shape \(16,\) is not 2-D"):
        cls([{"params": [model[0].weight, model[0].bias], "rank": 2}], **kwargs_for(cls))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("bad", ["nan", "inf", "sparse"])
def test_bad_gradient_raises_and_leaves_everything_untouched(cls, bad):
    model = mlp()
    data = regression_data()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    train(model, opt, 3, data)
    sd, params = snapshot(opt, model)
    opt.zero_grad()
    nn.functional.mse_loss(model(data[0]), data[1]).backward()
    target = model[4].weight  # a dense parameter late in the order: earlier ones must not move either
    if bad == "sparse":
        target.grad = target.grad.to_sparse()
        err, msg = RuntimeError, "sparse"
    else:
        target.grad[0, 0] = float(bad)
        err, msg = la.NonFiniteGradientError, r"shape \(1, 12\) at its step 4"
    with pytest.raises(err, match=msg):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert_same_state(sd, opt.state_dict())


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_check_finite_is_a_group_option(cls):
    model = mlp()
    groups = mlp_groups(model, cls=cls)
    groups[0]["check_finite"] = False  # the dense group: biases and the last layer
    opt = cls(groups, **kwargs_for(cls))
    nn.functional.mse_loss(model(regression_data()[0]), regression_data()[1]).backward()
    model[4].bias.grad[0] = float("nan")  # unchecked: the step goes through
    opt.step()
    assert torch.isnan(model[4].bias).any()
    model[2].weight.grad[0, 0] = float("nan")  # in the checked group: refused
    with pytest.raises(la.NonFiniteGradientError, match=r"shape \(12, 16\)"):
        opt.step()


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("kind", ["zeros", "rank1"])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (1, 7)])
def test_degenerate_gradients_stay_finite(cls, kind, shape):
    p = nn.Parameter(torch.randn(shape))
    groups = [{"params": [p], "rank": 4}] if cls.__name__ != "Adapprox" else [p]
    opt = cls(groups, **kwargs_for(cls))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 4 > min(m, n) for (1, 7) warns
        for i in range(8):
            p.grad = matrix(shape, i, kind)
            opt.step()
    assert torch.isfinite(p).all()
    for v in opt.state[p].values():
        if isinstance(v, torch.Tensor):
            assert torch.isfinite(v).all()


def test_lowrank_groups_convention():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(4, 4, bias=True)
            self.mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10)

    m = Block()
    groups = la.lowrank_groups(m, 3, update_proj_gap=50)
    dense, lowrank = groups
    assert lowrank["rank"] == 3 and lowrank["update_proj_gap"] == 50
    assert {id(p) for p in lowrank["params"]} == {id(m.attn.weight), id(m.mlp[0].weight), id(m.mlp[1].weight)}
    assert len(dense["params"]) + len(lowrank["params"]) == len(list(m.parameters()))
    assert id(m.head.weight) in {id(p) for p in dense["params"]}


def test_lowrank_groups_warns_when_a_target_matches_nothing():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 8))
    model.add_module("fc2", nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"\['attn', 'mlp'\] match no 2-D parameter.*fc1.weight, fc2.weight"):
        groups = la.lowrank_groups(model, 2)
    assert all(g["rank"] is None for g in groups)  # nothing would be low-rank: hence the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = la.lowrank_groups(model, 2, targets=("fc1", "fc2"))
    assert groups[1]["params"] == [model.fc1.weight, model.fc2.weight]
    with warnings.catch_warnings():  # one pattern of several matches: the selection is not empty, no warning
        warnings.simplefilter("error")
        groups = la.lowrank_groups(model, 2, targets=("fc1", "qkv"))
    assert groups[1]["params"] == [model.fc1.weight]


def test_state_bytes_galore_formula():
    a, b = nn.Parameter(torch.randn(20, 8)), nn.Parameter(torch.randn(5))
    opt = la.GaLoreAdamW([{"params": [a], "rank": 3}, {"params": [b]}])
    a.grad, b.grad = torch.randn(20, 8), torch.randn(5)
    opt.step()
    s, l, r = 8, 20, 3
    assert la.state_bytes(opt) == 4 * (2 * r * l + s * r + 2 * 5)
    assert la.state_bytes(opt, by_key=True)["P"] == 4 * s * r


# The README's table of state per m×n matrix (s, l: short and long side; r, k: the rank),
# in floats of the state's dtype: float32, Adapprox's factors float64 (its + 1: the scale
# exponent). AdaptiveAdamW also keeps its limiter's last RMS, one float the table leaves out.
STATE_FORMULAS = {
    "GaLoreAdamW": (la.GaLoreAdamW, {}, lambda m, n, s, l, r: 4 * (2 * r * l + s * r)),
    "GaLoreAdamW gha": (la.GaLoreAdamW, dict(subspace="gha"), lambda m, n, s, l, r: 4 * (2 * r * l + 2 * s * r)),
    "AdaptiveAdamW": (la.AdaptiveAdamW, {}, lambda m, n, s, l, r: 4 * (2 * r * l + s * r + 1)),
    "LDAdam": (la.LDAdam, {}, lambda m, n, s, l, r: 4 * (2 * r * l + s * r + m * n)),
    "LDAdam bf16 error": (la.LDAdam, dict(error_dtype=torch.bfloat16),
                          lambda m, n, s, l, r: 4 * (2 * r * l + s * r) + 2 * m * n),
    "Adapprox": (la.Adapprox, {}, lambda m, n, s, l, k: 8 * (k * (m + n) + m + n + 1) + 4 * m * n),
    "Adapprox beta1=0": (la.Adapprox, dict(betas=(0.0, 0.999)), lambda m, n, s, l, k: 8 * (k * (m + n) + m + n + 1)),
}


@pytest.mark.parametrize("case", list(STATE_FORMULAS))
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)], ids=["wide", "tall"])
def test_state_bytes_per_matrix_follow_the_readme_table(case, shape):
    """The state of each m×n matrix after a step, as the README's table gives
    it, and nothing before the first step (``state_bytes``: 0, by key: {})."""
    cls, options, formula = STATE_FORMULAS[case]
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(shape, generator=g))
    opt = cls([{"params": [p], "rank": 3}], **options)
    assert la.state_bytes(opt) == 0 and la.state_bytes(opt, by_key=True) == {}
    (m, n), r = shape, opt.ranks()[0]  # (Adapprox: the rank of this step; ranks() then gives the next one's)
    p.grad = torch.randn(shape, generator=g)
    opt.step()
    assert la.state_bytes(opt) == formula(m, n, min(shape), max(shape), r)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_a_grad_scaler_steps_every_optimizer_and_skips_an_overflowing_step(cls):
    """The README's drop-in promise for ``torch.amp.GradScaler``: a scaled run
    equals the unscaled one bit for bit (the scale is a power of two, and the
    scaler unscales the gradients before ``step``); a step whose scaled
    gradients overflow is skipped by the scaler (our NaN/Inf check never sees
    it), nothing changes, and the scale is lowered."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**16)):
        model = mlp()
        opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
        x, y = regression_data()
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    before = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()])
    opt.zero_grad(set_to_none=True)
    scaler.scale(nn.functional.mse_loss(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before[1], model.parameters()))
    assert_same_state(before[0], opt.state_dict())
    assert scaler.get_scale() == 2.0**15


class FullSizeAllocations(TorchDispatchMode):
    """Counts the tensors of at least ``numel`` elements that ops allocate
    (outputs that share storage with none of the op's inputs)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops, self.dtypes = numel, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.ops.append(func.__name__)
                self.dtypes.append(t.dtype)
        return out


@pytest.mark.parametrize("cls", [*OPTIMIZERS, "Adapprox, float32 factors"],
                         ids=[c.__name__ for c in OPTIMIZERS] + ["Adapprox-float32"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_one_full_size_temporary_per_matrix_and_step(cls, shape):
    # Memory is the point: besides its state, a normal step allocates one m×n
    # float32 temporary per matrix (the back-projected update, or Adapprox's V);
    # Adapprox's default float64 V is one float64 temporary, then a float32 update.
    f32 = cls == "Adapprox, float32 factors"
    cls = la.Adapprox if f32 else cls
    p = nn.Parameter(torch.randn(shape))
    no_refresh = {"Adapprox": dict(rank_init=4, factor_dtype="float32" if f32 else "float64"),
                  "GaLoreAdamW": dict(update_proj_gap=100), "AdaptiveAdamW": dict(update_proj_gap=100)}
    opt = cls([{"params": [p], "rank": 4}] if "rank" in cls.group_keys else [p],
              **kwargs_for(cls, **no_refresh.get(cls.__name__, {})))
    for step in range(3):
        p.grad = torch.randn(shape)
        with FullSizeAllocations(p.numel()) as counter:
            opt.step()
        if step > 0:  # step 1 allocates the state (and GaLore's first SVD)
            expected = [torch.float64, torch.float32] if cls is la.Adapprox and not f32 else [torch.float32]
            assert counter.dtypes == expected, counter.ops


def test_rms_of_an_empty_tensor_is_zero_not_nan():
    # the max(numel, 1) guard: an empty tensor has RMS 0 (a NaN would be stored
    # as a limiter's history, or divide an Adapprox update)
    for x in (torch.zeros(0), torch.zeros(0, 5)):
        r = rms(x)
        assert r.dim() == 0 and r.item() == 0.0
    # seen through an optimizer: the residual limiter's history of an empty matrix
    p = nn.Parameter(torch.zeros(0, 5))
    opt = la.GaLoreAdamW([{"params": [p], "rank": 1, "residual": True}], lr=1e-2)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.state[p]["rms"].item() == 0.0


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_a_zero_learning_rate_is_accepted_like_torch_adamw(cls):
    # torch.optim.AdamW accepts lr=0 (a warmup that starts at 0, a frozen phase);
    # only a negative lr is invalid
    torch.optim.AdamW(mlp().parameters(), lr=0.0)
    model = mlp()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls, lr=0.0))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_beta2_of_one_is_refused(cls):
    # beta2 = 1 makes the bias correction 1 - beta2^t zero: every update NaN
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        cls(mlp_groups(mlp(), cls=cls), **kwargs_for(cls, betas=(0.9, 1.0)))


@pytest.mark.parametrize("cls", [c for c in OPTIMIZERS if c.__name__ != "Adapprox"], ids=ids)
def test_a_bool_rank_is_refused(cls):
    # True is an int in Python; a rank of True would silently mean rank 1
    groups = mlp_groups(mlp(), cls=cls)
    groups[1]["rank"] = True
    with pytest.raises(ValueError, match="Invalid rank"):
        cls(groups, **kwargs_for(cls))


@pytest.mark.parametrize("cls", [c for c in OPTIMIZERS if c.__name__ != "Adapprox"], ids=ids)
def test_a_rank_equal_to_the_short_side_does_not_warn(cls):
    # only a rank that exceeds min(m, n) is clamped (and warned about, once)
    model = mlp()  # hidden weights 16×8 and 12×16: min sides 8 and 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = cls(mlp_groups(model, rank=8, cls=cls), **kwargs_for(cls))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    model = mlp()
    with pytest.warns(UserWarning, match="rank 9 exceeds min"):  # when the group joins
        cls(mlp_groups(model, rank=9, cls=cls), **kwargs_for(cls))


def test_lowrank_groups_lists_a_tied_weight_once():
    # a weight shared by two matched nn.Linear modules (weight tying) is one
    # parameter: listed twice, torch would see a duplicate in the group
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(6, 6, bias=False)
            self.mlp = nn.Linear(6, 6, bias=False)
            self.mlp.weight = self.attn.weight
            self.norm = nn.LayerNorm(6)

    model = Tied()
    groups = la.lowrank_groups(model, rank=2)
    lowrank = [g for g in groups if g["rank"] is not None]
    assert len(lowrank) == 1 and len(lowrank[0]["params"]) == 1
    assert lowrank[0]["params"][0] is model.attn.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.GaLoreAdamW(groups, lr=1e-2)


def test_lowrank_groups_selects_a_tied_weight_by_any_of_its_names_and_lists_it_by_its_first(capsys):
    # ``proj.weight`` is also registered as ``mlp.weight`` (tied): selected through
    # its second name, listed once, and named as torch names it (its first name,
    # the one named_parameters() and the state dict use); likewise a dense tied pair
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 5, bias=False)
            self.mlp = nn.Linear(6, 5, bias=False)
            self.mlp.weight = self.proj.weight
            self.head = nn.Linear(5, 3, bias=False)
            self.out = nn.Linear(5, 3, bias=False)
            self.out.weight = self.head.weight

    model = Tied()
    assert [n for n, _ in model.named_parameters()] == ["proj.weight", "head.weight"]
    dense, lowrank = la.lowrank_groups(model, 2, targets=("mlp",), verbose=True)
    assert lowrank["params"] == [model.proj.weight] and dense["params"] == [model.head.weight]
    assert capsys.readouterr().out.splitlines() == [
        "lowrank_groups: 1 matrices at rank 2: proj.weight 5×6",
        "lowrank_groups: 1 dense parameters: head.weight 3×5"]
    # a pattern that matches nothing warns with every name a 2-D parameter has, tied ones included
    with pytest.warns(UserWarning, match=r"\['qkv'\] match no 2-D parameter of this model \(its 2-D parameters: "
                                         r"proj.weight, mlp.weight, head.weight, out.weight\)"):
        la.lowrank_groups(model, 2, targets=("qkv",))


def test_lowrank_groups_takes_one_target_string_and_gives_the_dense_group_only_its_rank(capsys):
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.Linear(4, 4), "mlp": nn.Linear(4, 8, bias=False), "lm": nn.Linear(4, 2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "mlp" is one pattern, which matches, not the letters m, l and p
        dense, lowrank = la.lowrank_groups(model, 2, targets="mlp", update_proj_gap=7, scale=0.5)
    assert lowrank["params"] == [model["mlp"].weight] and lowrank["rank"] == 2
    assert lowrank["update_proj_gap"] == 7 and lowrank["scale"] == 0.5
    # the plain group holds its parameters and rank None, and none of the low-rank options
    assert set(dense) == {"params", "rank"} and dense["rank"] is None
    assert len(dense["params"]) == 4  # attn's weight and bias, lm's weight and bias
    # every parameter selected: no dense group, and the listing says "none"
    everything = nn.ModuleDict({"mlp": nn.Linear(4, 8, bias=False)})
    assert la.lowrank_groups(everything, 2, targets="mlp", verbose=True) == [
        {"params": [everything["mlp"].weight], "rank": 2}]
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "lowrank_groups: 0 dense parameters: none"


def test_lowrank_groups_does_not_warn_for_a_target_that_names_an_embedding_left_dense():
    # "a pattern that matches no 2-D parameter warns": "emb" matches the embedding's
    # weight, a 2-D parameter, which stays dense because embeddings=False -- no warning
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "mlp": nn.Linear(4, 4)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense, lowrank = la.lowrank_groups(model, 2, targets=("emb", "mlp"))
    assert lowrank["params"] == [model["mlp"].weight] and model["emb"].weight in dense["params"]


def test_step_parameter_follows_a_group_replaced_by_add_param_group():
    # add_param_group invalidates step_parameter's lookup table even when the
    # parameter count comes out unchanged (a group removed, another added)
    a, b, c = (nn.Parameter(torch.randn(5, 7)) for _ in range(3))
    opt = la.GaLoreAdamW([{"params": [a]}, {"params": [b], "rank": 2}], lr=1e-2)
    b.grad = torch.randn(5, 7)
    opt.step_parameter(b)  # builds the lookup table
    opt.param_groups.pop()
    opt.add_param_group({"params": [c], "rank": 2})
    c.grad = torch.randn(5, 7)
    opt.step_parameter(c)
    assert opt.state[c]["step"] == 1


def test_step_parameter_after_load_state_dict_reads_the_loaded_groups():
    # load_state_dict puts new group dicts in param_groups (torch's does); the layer-wise steps after it,
    # in an optimizer that already stepped layer-wise, must read their options, as step() does. With the
    # loaded lr = 0, W <- W (1 - lr wd) - lr update leaves every weight as it is.
    model = mlp()
    opt = la.GaLoreAdamW(mlp_groups(model), lr=1e-2, weight_decay=0.1)
    engine.layerwise_hooks(opt)
    x, y = regression_data()
    nn.functional.mse_loss(model(x), y).backward()  # a layer-wise step of every parameter
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        group["lr"] = 0.0
    opt.load_state_dict(sd)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.mse_loss(model(x), y).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())


def test_step_parameter_reaches_a_parameter_appended_to_a_groups_list():
    # step() steps whatever the groups' lists hold now; so does step_parameter
    a, b = nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(5, 7))
    opt = la.GaLoreAdamW([{"params": [a], "rank": 2}], lr=1e-2)
    a.grad = torch.randn(5, 7)
    opt.step_parameter(a)
    opt.param_groups[0]["params"].append(b)
    b.grad = torch.randn(5, 7)
    opt.step_parameter(b)
    assert opt.state[b]["step"] == 1


def test_a_subclass_of_an_optimizer_is_named_as_the_owner_of_its_group_options():
    # optimizer_options covers subclasses at any depth: another optimizer refusing the option of a
    # subclass of GaLoreAdamW names that subclass
    import gc

    class TunedGaLore(la.GaLoreAdamW):
        group_keys = la.GaLoreAdamW.group_keys + ("tuning",)

    try:
        assert "tuning" in engine.optimizer_options()["TunedGaLore"]
        with pytest.raises(ValueError, match=r"no group option 'tuning' \(an option of TunedGaLore\)"):
            la.LDAdam([{"params": [nn.Parameter(torch.randn(4, 4))], "rank": 2, "tuning": 1}])
    finally:
        del TunedGaLore
        gc.collect()
    assert "TunedGaLore" not in engine.optimizer_options()  # gone: the other tests' lists are unchanged


# =============================================================================
# Wherever it is pasted: torch.compile, FSDP1, FSDP2, a class copied out alone,
# Hugging Face GPT-2, options changed between steps, the layout of loaded state
# =============================================================================

# Cases that reach the most code: a tall, a square and a wide matrix and dense
# biases, 8 steps with T = 3, so that refreshes (with stagger: at different steps
# for different matrices) fall between runs of plain steps.
COMPILE_CASES = {
    "GaLoreAdamW": (la.GaLoreAdamW, dict(residual=True, stagger=True)),
    "GaLoreAdamW-random": (la.GaLoreAdamW, dict(subspace="random")),
    "AdaptiveAdamW-stagger": (la.AdaptiveAdamW, dict(stagger=True)),
    "LDAdam": (la.LDAdam, dict()),
    "Adapprox": (la.Adapprox, dict(cosine_guidance=True)),
}


def compile_toy_run(case, compiled, steps=8):
    cls, opts = COMPILE_CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 12))
    if cls is not la.Adapprox:  # Adapprox: every matrix factored, its ranks its own
        gap = {} if cls is la.LDAdam else {"update_proj_gap": 3}
        opt = cls(la.lowrank_groups(model, 3, targets=("0", "2", "4"), **gap, **opts), lr=1e-2)
    else:
        opt = cls(model.parameters(), lr=1e-2, **opts)
    step = torch.compile(opt.step) if compiled else opt.step  # inductor, on the CPU
    g = torch.Generator().manual_seed(1)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        step()
    counts = [opt.state[p]["step"] for p in model.parameters()]
    return start, [p.detach().clone() for p in model.parameters()], (opt.ranks(), counts)


@pytest.mark.parametrize("case", COMPILE_CASES)
@pytest.mark.slow
def test_compiled_step_equals_the_eager_step(case):
    # torch 2.13's inductor fused add(W, mm(a, b), alpha=-lr) into an addmm that
    # dropped alpha (GaLore and LDAdam stepped ~100x too far). And dynamo, once a
    # per-matrix step recompiled with a dynamic step count, resolved `self.state[p]`
    # to the first matrix's state for every matrix (GaLoreAdamW took two steps of one
    # matrix per call, and none of the other), so each per-matrix step is handed its
    # state. Compiled and eager runs differ only by float32 rounding: measured about
    # 4e-7 of the weights' movement; either bug gives 1e-1 or more.
    torch._dynamo.reset()
    start, eager, eager_counts = compile_toy_run(case, compiled=False)
    logged = []  # what torch logs (its handler writes to the stderr it found at import, which capfd misses)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("torch", "torch._dynamo", "torch._inductor")]
    for logger in loggers:  # (dynamo's and inductor's do not propagate to torch's)
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, compiled, compiled_counts = compile_toy_run(case, compiled=True)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    # the host syncs are quiet graph breaks (the README's promise): no block of advice from dynamo
    printed = "".join(logged) + "".join(str(w.message) for w in caught)
    assert "Graph break" not in printed and "Dynamo does not know" not in printed, printed[:2000]
    assert compiled_counts == eager_counts and eager_counts[1] == [8] * 6  # (ranks, each tensor's step count)
    for w0, a, b in zip(start, eager, compiled):
        moved = (a - w0).abs().max()
        assert moved > 0
        assert (a - b).abs().max() <= 1e-4 * moved


@pytest.mark.parametrize("cls, options", [(la.GaLoreAdamW, {}), (la.GaLoreAdamW, {"subspace": "gha", "stagger": True}),
                                          (la.LDAdam, {})], ids=["GaLoreAdamW-svd", "GaLoreAdamW-gha-stagger", "LDAdam"])
@pytest.mark.slow
def test_fullgraph_compile_without_the_finite_check_equals_eager(cls, options):
    # the README's promise: with check_finite=False these compile with fullgraph=True
    # (no graph break at all), refreshes included, and equal the eager steps
    def run(compiled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 20, bias=False), nn.Tanh(), nn.Linear(20, 12))
        gap = {} if cls is la.LDAdam else {"update_proj_gap": 2}
        opt = cls(la.lowrank_groups(model, 3, targets=("0", "2"), **gap, **options), lr=1e-2, check_finite=False)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        g = torch.Generator().manual_seed(1)
        start = [p.detach().clone() for p in model.parameters()]
        for _ in range(3):  # refreshes at steps 1 and 3
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            step()
        return start, [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    start, eager = run(False)
    _, compiled = run(True)
    for w0, a, b in zip(start, eager, compiled):
        assert (a - b).abs().max() <= 1e-4 * (a - w0).abs().max()


def test_fsdp1_flattened_parameters_are_refused_before_anything_changes():
    # FSDP1 marks every parameter it flattens (into 1-D shards) with
    # _fsdp_flattened; a low-rank method would run on them as plain AdamW
    for cls in OPTIMIZERS:
        model = mlp()
        model[0].weight._fsdp_flattened = True  # wrapped before the optimizer is built
        with pytest.raises(ValueError, match="FullyShardedDataParallel"):
            cls(model.parameters(), **kwargs_for(cls))
        with pytest.raises(ValueError, match="FSDP1"):
            la.lowrank_groups(model, 3, targets=("0", "2"))
        model = mlp()
        opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
        train(model, opt, 2, regression_data())
        before = snapshot(opt, model)
        model[2].weight._fsdp_flattened = True  # wrapped after
        with pytest.raises(ValueError, match="ZeroRedundancyOptimizer"):
            train(model, opt, 1, regression_data())
        after = snapshot(opt, model)
        assert_same_state(before[0], after[0])
        assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))


FSDP1_BODY = """
# FSDP1 on the same 2 processes (run last: it replaces FSDP2_SCRIPT's model): weights become 1-D shards
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
opt = la.GaLoreAdamW(la.lowrank_groups(model, 2, targets=("0", "2")), lr=1e-2)  # built before wrapping
model = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
shapes = sorted(tuple(p.shape) for p in model.parameters())
fsdp1 = open(os.path.join(sys.argv[2], f"fsdp1_rank{dist.get_rank()}.txt"), "w")  # one file per rank
for build in ("after", "before"):
    try:
        if build == "after":
            la.lowrank_groups(model, 2, targets=("0", "2"))
        else:
            model(torch.randn(3, 8)).sum().backward()
            opt.step()
        print(build, "not refused", shapes, flush=True, file=fsdp1)
    except ValueError as e:
        print(build, "refused:", "FullyShardedDataParallel" in str(e), flush=True, file=fsdp1)
"""


@pytest.mark.slow
def test_fsdp1_is_refused_under_torchrun(fsdp2_runs):
    # the real engine on 2 gloo processes (those of FSDP2_SCRIPT): weights become 1-D shards
    for rank in (0, 1):
        lines = (fsdp2_runs / f"fsdp1_rank{rank}.txt").read_text().splitlines()
        assert lines == ["after refused: True", "before refused: True"], lines



# -- FSDP2: every optimizer and option on 2 gloo processes ---------------------

FSDP2_SCRIPT = """
import io, os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, sys.argv[1])
import lowrank_adam as la
import lowrank_engine as engine
torch.set_num_threads(1)
dist.init_process_group("gloo")
CASES = [  # each optimizer with the options that change what a step computes
    ("GaLoreAdamW", {}), ("GaLoreAdamW", dict(subspace="random", stagger=True)),
    ("GaLoreAdamW", dict(subspace="gha", residual=True)), ("GaLoreAdamW", dict(refresh="randomized", proj_type="left")),
    ("AdaptiveAdamW", dict(stagger=True)), ("AdaptiveAdamW", dict(refresh="randomized", refresh_keep=None)),
    ("AdaptiveAdamW", dict(residual=False, transform_momentum=False, rank_metric="gap")),
    ("LDAdam", {}), ("LDAdam", dict(proj_method="svd", error_dtype=torch.bfloat16)),
    ("Adapprox", {}), ("Adapprox", dict(cosine_guidance=True, nonneg="floor")),
    ("GaLoreAdamW", dict(residual=True, dtype=torch.bfloat16)),  # bf16 weights, float32 state
]

def model(dtype=torch.float32):  # odd row counts: uneven shards, and rank 1 holds an empty shard of the (1, 7) head
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 11), nn.Tanh(), nn.Linear(11, 5), nn.Tanh(),
                         nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(dtype)

def sharded(dtype=torch.float32):
    m = model(dtype)
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(m)

def optimizer(name, opts, m):
    cls = getattr(la, name)
    if name == "Adapprox":  # every matrix factored; a tolerance at which the ranks move
        return cls(m.parameters(), lr=1e-2, weight_decay=0.1, err_tol=0.05, **opts)
    gap = {} if name == "LDAdam" else {"update_proj_gap": 3}  # refreshes at steps 1, 4, 7
    return cls(la.lowrank_groups(m, 2, targets=("0", "2", "4", "6"), **gap), lr=1e-2, weight_decay=0.1, **opts)

g = torch.Generator().manual_seed(1)
x = torch.randn(16, 6, generator=g)
y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]  # the same batch on each rank: the averaged gradient is exact

class Collectives(TorchDispatchMode):  # every collective a step issues, DTensor's implicit ones included
    count = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Collectives.count += func.namespace in ("c10d", "_c10d_functional")
        return func(*args, **(kwargs or {}))

def train(m, opt, steps):
    calls = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(m(x.to(m[0].weight.dtype)).float(), y).backward()
        Collectives.count = 0
        with Collectives():
            opt.step()
        calls.append(Collectives.count)
    return calls

out = {}
for name, opts in CASES:
    key = f"{name} {sorted(opts.items())}"
    opts = dict(opts)
    dtype = opts.pop("dtype", torch.float32)
    one = model(dtype)  # the same optimizer in one process: the expectation
    one_opt = optimizer(name, opts, one)
    train(one, one_opt, 7)
    m = sharded(dtype)
    opt = optimizer(name, opts, m)
    calls = train(m, opt, 7)
    tensors = lambda sd: {k: {n: v for n, v in st.items() if isinstance(v, torch.Tensor)} for k, st in sd["state"].items()}
    state = tensors(get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True)))
    # the same FSDP2 run, resumed after step 5 (mid-gap) through torch.distributed.checkpoint's helpers (and
    # bytes, as a file)
    m2 = sharded(dtype)
    opt2 = optimizer(name, opts, m2)
    train(m2, opt2, 5)
    buf = io.BytesIO()
    torch.save(get_optimizer_state_dict(m2, opt2), buf)
    opt2 = optimizer(name, opts, m2)
    buf.seek(0)
    set_optimizer_state_dict(m2, opt2, torch.load(buf, weights_only=False))
    train(m2, opt2, 2)
    m3 = None
    if not opts and name in ("GaLoreAdamW", "LDAdam"):  # fixed ranks: also through files, dcp.save and dcp.load
        m3 = sharded()
        opt3 = optimizer(name, opts, m3)
        train(m3, opt3, 5)
        path = os.path.join(sys.argv[2], name)
        dcp.save({"optim": get_optimizer_state_dict(m3, opt3)}, checkpoint_id=path)
        opt3.zero_grad(set_to_none=True)  # else torch's helpers take the optimizer for initialized
        opt3 = optimizer(name, opts, m3)
        loaded = {"optim": get_optimizer_state_dict(m3, opt3)}  # the template (shapes) to load into
        dcp.load(loaded, checkpoint_id=path)
        set_optimizer_state_dict(m3, opt3, loaded["optim"])
        train(m3, opt3, 2)
        m3 = [p.full_tensor().detach() for p in m3.parameters()]
    out[key] = dict(
        start=[p.detach() for p in model(dtype).parameters()], one=[p.detach() for p in one.parameters()],
        fsdp2=[p.full_tensor().detach() for p in m.parameters()],
        resumed=[p.full_tensor().detach() for p in m2.parameters()], dcp=m3,
        state=state, one_state=tensors(get_optimizer_state_dict(one, one_opt)),
        ranks={i: st["rank"] for i, p in enumerate(m.parameters()) if "rank" in (st := opt.state[p])},
        one_ranks=one_opt.ranks(), every_ranks=opt.ranks(), calls=calls, bytes=la.state_bytes(opt), one_bytes=la.state_bytes(one_opt),
        held=[i for i, p in enumerate(m.parameters()) if any(isinstance(v, torch.Tensor) for v in opt.state[p].values())])
# a NaN in one rank's shard of one gradient: every rank raises, and nothing changes anywhere
m = sharded()
opt = optimizer("AdaptiveAdamW", {}, m)
train(m, opt, 2)
local = lambda t: t.to_local() if hasattr(t, "to_local") else t
snapshot = lambda: [local(p).clone() for p in m.parameters()] + [
    local(v).clone() for p in m.parameters() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
before = snapshot()
opt.zero_grad(set_to_none=True)
nn.functional.mse_loss(m(x), y).backward()
if dist.get_rank() == 1:
    m[2].weight.grad.to_local()[0, 0] = float("nan")
try:
    opt.step()
    out["nan"] = "not raised"
except la.NonFiniteGradientError as e:
    out["nan"] = all(torch.equal(a, b) for a, b in zip(before, snapshot())) and len(before) == len(snapshot())
torch.save(out, os.path.join(sys.argv[2], f"rank{dist.get_rank()}.pt"))
"""
ZERO_BODY = """
# DDP and ZeRO-1 (torch's ZeroRedundancyOptimizer) on the same 2 processes (after FSDP2_SCRIPT's cases, with its
# model and data): every optimizer, 4 steps
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel
zero_out = {}
for name in ("GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox"):
    runs = {}
    for how in ("one process", "ZeRO-1"):
        net = model()
        groups = list(net.parameters()) if name == "Adapprox" else la.lowrank_groups(
            net, 2, targets=("0", "2", "4", "6"), **({} if name == "LDAdam" else {"update_proj_gap": 2}))
        options = dict(lr=1e-2, weight_decay=0.1, **({"err_tol": 0.05} if name == "Adapprox" else {}))
        if how == "ZeRO-1":
            net = DistributedDataParallel(net)
            opt = ZeroRedundancyOptimizer(groups, optimizer_class=getattr(la, name), **options)
        else:
            opt = getattr(la, name)(groups, **options)
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        runs[how] = [p.detach().clone() for p in net.parameters()]
    mine = [p for g in opt.optim.param_groups for p in g["params"]]  # this rank's shard, its own optimizer
    zero_out[name] = dict(**runs, held=[i for i, p in enumerate(net.parameters()) if any(p is q for q in mine)],
                          with_state=[i for i, p in enumerate(net.parameters()) if opt.optim.state.get(p)],
                          ranks=opt.optim.ranks(), matrices=sum(len(g["params"]) for g in opt.optim.param_groups
                                                                if g.get("rank") is not None))
torch.save(zero_out, os.path.join(sys.argv[2], f"zero{dist.get_rank()}.pt"))
"""


def test_ddp_and_zero1_step_every_optimizer_with_each_ranks_state_on_its_shard(fsdp2_runs):
    # The README: DDP and ZeRO-1 work with all four; each rank keeps the state of its shard
    # of the parameters, and AdaptiveAdamW allocates each rank's budget over its own matrices.
    # GaLoreAdamW and LDAdam depend on nothing random: ZeRO-1 steps each matrix as one process
    # does, bit for bit. Adapprox's sketches are seeded by the parameter's index in the rank's
    # own optimizer, so its run differs from one process's, but not between the replicas.
    per_rank = [torch.load(fsdp2_runs / f"zero{r}.pt", weights_only=False) for r in (0, 1)]
    for name, r0 in per_rank[0].items():
        r1 = per_rank[1][name]
        assert all(torch.equal(a, b) for a, b in zip(r0["ZeRO-1"], r1["ZeRO-1"])), name  # identical replicas
        assert sorted(r0["held"] + r1["held"]) == list(range(10)), name  # the shards: every parameter, once
        assert all(set(r["with_state"]) == set(r["held"]) for r in (r0, r1)), name  # state for its shard alone
        if name in ("GaLoreAdamW", "LDAdam"):
            assert all(torch.equal(a, b) for a, b in zip(r0["ZeRO-1"], r0["one process"])), name
        if name != "Adapprox":  # each rank's budget: rank 2 for each of its own matrices
            assert all(sum(r["ranks"]) == 2 * r["matrices"] and r["matrices"] > 0 for r in (r0, r1)), name
    assert any(len(set(r["AdaptiveAdamW"]["ranks"])) > 1 for r in per_rank)  # an allocation took place


TWO_PROCESSES_END = """dist.barrier()  # no rank tears gloo down while the other still runs a collective (else SIGABRT)
dist.destroy_process_group()
os._exit(0)  # skip the interpreter's teardown, where gloo now and then aborts (SIGABRT)
"""


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    """FSDP2_SCRIPT, then FSDP2_LAYERWISE, ZERO_BODY and FSDP1_BODY in the same 2 gloo
    processes (one start of torchrun for all): the folder of each rank's results."""
    tmp_path = tmp_path_factory.mktemp("fsdp2_runs")
    run_on_two_processes(tmp_path, FSDP2_SCRIPT + FSDP2_LAYERWISE + ZERO_BODY + FSDP1_BODY + TWO_PROCESSES_END,
                         "fsdp2.py")
    return tmp_path


def test_fsdp2_every_optimizer_equals_one_process_with_sharded_state_and_resumes_exactly(fsdp2_runs):
    # FSDP2 (fully_shard) on 2 gloo processes: weights are DTensors split by rows.
    # Each low-rank matrix is stepped whole on one owner rank, which alone holds
    # its state; the result must be the one-process run's (7 steps: refreshes,
    # AdaptiveAdamW's allocation over every rank's matrices, Adapprox's rank
    # changes, random subspaces and sketches seeded by the global parameter index).
    per_rank = [torch.load(fsdp2_runs / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r.pop("nan") for r in per_rank] == [True, True]  # raised on both ranks, nothing changed
    assert len(per_rank[0]) == 12 and sum(r["dcp"] is not None for r in per_rank[0].values()) == 2
    for case, r0 in per_rank[0].items():
        r1 = per_rank[1][case]
        for w0, one, fsdp2, resumed in zip(r0["start"], r0["one"], r0["fsdp2"], r0["resumed"]):
            assert not torch.equal(one, w0), case  # it trained
            assert (fsdp2 - one).abs().max() <= 1e-6 * one.abs().max(), case  # measured: equal bit for bit
            assert torch.equal(resumed, fsdp2), case  # the resumed run is the uninterrupted one
        if r0["dcp"] is not None:
            assert all(torch.equal(a, b) for a, b in zip(r0["dcp"], r0["fsdp2"])), case
        # the state, gathered (torch's full state dict: DTensor shards joined, each matrix's from its owner),
        # is one process's, on both ranks
        for name, expected in r0["one_state"].items():
            for key, v in expected.items():
                held = [r["state"][name][key] for r in (r0, r1) if key in r["state"][name]]
                assert len(held) == 2, (case, name, key)
                assert all((h - v).abs().max() <= 1e-6 * v.abs().max() for h in held), (case, name, key)
        # every rank allocated (AdaptiveAdamW) or adapted (Adapprox) each rank as one process did
        assert [{**r0["ranks"], **r1["ranks"]}.get(i) for i in sorted({**r0["ranks"], **r1["ranks"]})] == \
            r0["one_ranks"], case
        assert r0["every_ranks"] == r1["every_ranks"] == r0["one_ranks"], case  # ranks() on every rank, too
        assert all(type(k) is int for k in r0["every_ranks"] + r1["every_ranks"]), case
        # each matrix's low-rank state on one rank (its owner), dense shards' on both: together one process's bytes
        # (Adapprox: every parameter, as its clipping reads a whole tensor)
        whole = range(10) if case.startswith("Adapprox") else (0, 2, 4, 6)
        holders = [[i in r["held"] for r in (r0, r1)] for i in whole]
        assert all(sum(h) == 1 for h in holders) and all(any(h[r] for h in holders) for r in (0, 1)), case
        assert all(i in r["held"] for i in set(range(10)) - set(whole) for r in (r0, r1)), case
        assert r0["bytes"] + r1["bytes"] == r0["one_bytes"] and max(r0["bytes"], r1["bytes"]) < r0["one_bytes"]
        # collectives per step, whatever the number of matrices: NaN check, gather, scatter (AdaptiveAdamW: one
        # more all-reduce, and at a refresh the spectra's all-gather, two collectives)
        assert max(r0["calls"]) == (6 if case.startswith("AdaptiveAdamW") else 3), (case, r0["calls"])
    adaptive = [r["one_ranks"] for c, r in per_rank[0].items() if c.startswith(("AdaptiveAdamW", "Adapprox"))]
    assert all(len(set(ranks)) > 1 for ranks in adaptive)  # the ranks differ between matrices: allocation tested


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_fsdp2_row_split_is_torch_chunks(world):
    # FSDP2 shards dim 0 as torch.chunk does (ranks past the last chunk get 0 rows); the owner rank
    # assembles each matrix from these row counts, at any number of ranks
    for rows in range(20):
        chunks = [c.shape[0] for c in torch.arange(rows).chunk(world)]
        assert engine._row_split(rows, world) == chunks + [0] * (world - len(chunks)), rows


def test_fsdp2_steps_whole_only_weights_split_by_rows_on_the_last_mesh_dimension_and_replicated_on_the_others():
    # Stepped whole on an owner: a weight whose placements are (Shard(0),) on a 1-D mesh or (Replicate(),
    # Shard(0)) on HSDP's 2-D one. Columns split (Shard(1)), rows split twice, or a sharded or partial first
    # dimension are not row shards: a step refuses them rather than assemble a wrong matrix.
    from torch.distributed.tensor import Partial, Replicate, Shard
    cases = [((Shard(0),), True), ((Replicate(), Shard(0)), True), ((Shard(1),), False),
             ((Replicate(), Shard(1)), False), ((Shard(0), Shard(0)), False), ((Shard(1), Shard(0)), False),
             ((Partial(), Shard(0)), False), ((Replicate(),), False), ((Shard(0), Replicate()), False)]
    for placements, expected in cases:
        assert engine._row_sharded(types.SimpleNamespace(placements=placements)) is expected, placements


def test_fsdp2_refuses_a_mesh_of_three_dimensions_and_parameters_on_several_meshes():
    # Each step and load finds the one device mesh of the sharded parameters: 1-D, or 2-D (HSDP). A 3-D
    # mesh, or parameters on two meshes (whose shard groups differ), are refused, not stepped on the
    # first parameter's mesh. (Only a parameter's device_mesh, a mesh's ndim and == are read: stand-ins.)
    class Mesh:
        def __init__(self, ndim):
            self.ndim = ndim

    on = lambda mesh: types.SimpleNamespace(device_mesh=mesh)
    flat, hsdp = Mesh(1), Mesh(2)
    assert engine._mesh_of([on(flat), on(flat)]) is flat and engine._mesh_of([on(hsdp)]) is hsdp
    with pytest.raises(NotImplementedError, match="not a 3-D one"):
        engine._mesh_of([on(Mesh(3))])
    with pytest.raises(NotImplementedError, match="several meshes"):
        engine._mesh_of([on(flat), on(Mesh(1))])


def test_plain_tensors_have_no_fsdp2_owner():
    # Only a DTensor (a weight FSDP2 shards) is gathered whole on an owner rank; a plain parameter, low-rank
    # or Adapprox's, is stepped in place by every rank, so no owner is drawn for it
    model = mlp()
    for opt in (la.GaLoreAdamW(mlp_groups(model), lr=1e-2), la.Adapprox(model.parameters(), lr=1e-2)):
        assert engine._owner_ranks(opt, 2) == {}
        assert not any(engine._stepped_whole(opt, p, g) for g in opt.param_groups for p in g["params"])


# -- FSDP2: float64, even rows, a rank with no matrix due, meshes; checkpoints ---

# The start and end of the scripts below (2 gloo processes): a small model, its optimizers, snapshots
FSDP2_SMALL = """
import copy, io, os, sys, torch, torch.distributed as dist
from datetime import timedelta
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, get_state_dict,
                                                     set_optimizer_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
sys.path.insert(0, sys.argv[1])
import lowrank_adam as la
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a deadlock fails, not hangs
NAMES = ["GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox"]

def model(dtype=torch.float32):  # rows 8 and 6: even shards (4 + 4, 3 + 3); 5: uneven; 1: one empty shard
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, 1)).to(dtype)

def sharded(m, mesh=None):
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)

def optimizer(name, m, **over):
    cls = getattr(la, name)
    if name == "Adapprox":  # every matrix factored; a tolerance at which the ranks move
        return cls(m.parameters(), lr=1e-2, weight_decay=0.1, err_tol=0.05)
    gap = {} if name == "LDAdam" else {"update_proj_gap": 3}  # refreshes at steps 1 and 4
    return cls(la.lowrank_groups(m, 2, targets=("0", "2", "4"), **gap), lr=1e-2, weight_decay=0.1, **over)

g = torch.Generator().manual_seed(1)
x = torch.randn(16, 5, generator=g)
y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]

def train(m, opt, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(m(x.to(m[0].weight.dtype)), y.to(m[0].weight.dtype)).backward()
        opt.step()

full = lambda m: [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in m.parameters()]
local = lambda t: t.to_local() if hasattr(t, "to_local") else t

def snapshot(m, opt):  # this rank's weights, state and options, copied
    return ([local(p).detach().clone() for p in m.parameters()],
            [{k: local(v).clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for p in m.parameters()],
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])

def same(a, b):  # (betas: torch's full state dicts hand a tuple back as a list)
    eq = lambda u, v: torch.equal(u, v) if torch.is_tensor(u) and torch.is_tensor(v) else u == v
    options = lambda gs: [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()} for g in gs]
    return (all(eq(u, v) for u, v in zip(a[0], b[0])) and len(a[1]) == len(b[1]) and options(a[2]) == options(b[2])
            and all(s.keys() == t.keys() and all(eq(s[k], t[k]) for k in s) for s, t in zip(a[1], b[1])))

def refused(load):  # "loaded" if nothing was raised, else the error
    try:
        load()
        return "loaded"
    except Exception as e:
        return f"{type(e).__name__}: {e}"

out = {}
"""
FSDP2_END = """torch.save(out, os.path.join(sys.argv[2], f"rank{dist.get_rank()}.pt"))
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # skip the interpreter's teardown, where gloo now and then aborts (SIGABRT)
"""


FSDP2_PATHS = """
# 1. one process's results, in float32 and float64, with even row counts split over the ranks
for name in NAMES:
    for dtype in (torch.float32, torch.float64):
        one = model(dtype)
        train(one, optimizer(name, one), 5)
        m = sharded(model(dtype))
        opt = optimizer(name, m)
        train(m, opt, 5)
        out[(name, dtype)] = dict(one=full(one), fsdp2=full(m), ranks=opt.ranks())

# 2. AdaptiveAdamW: a rank with no matrix due still takes part in the global allocation
def adaptive(m, groups):
    low = [[m[i].weight for i in idx] for idx, _ in groups]
    return la.AdaptiveAdamW([{"params": [p for p in m.parameters() if all(p is not q for ps in low for q in ps)]}] + [
        {"params": ps, "rank": 3, "update_proj_gap": gap} for ps, (_, gap) in zip(low, groups)],
        lr=1e-2, weight_decay=0.1)
# "one matrix": rank 0 owns it, rank 1 owns none. "gaps": 2.weight's owner is rank 0 (due alone at steps 3
# and 5), 0.weight's and 4.weight's rank 1 (due alone at step 4)
for case, groups in [("one matrix", [((0,), 2)]), ("gaps", [((2,), 2), ((0, 4), 3)])]:
    one = model()
    one_opt = adaptive(one, groups)
    train(one, one_opt, 6)
    m = sharded(model())
    opt = adaptive(m, groups)
    train(m, opt, 6)
    held = [i for i, p in enumerate(m.parameters()) if "P" in opt.state[p]]
    out[("adaptive", case)] = dict(one=full(one), fsdp2=full(m), ranks=(one_opt.ranks(), opt.ranks()), held=held)

# 3. a 2-D mesh (HSDP: replicated over 1, sharded over 2) steps as the 1-D mesh does
mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
one = model()
train(one, optimizer("GaLoreAdamW", one), 6)
m = sharded(model(), mesh)
train(m, optimizer("GaLoreAdamW", m), 6)
out["2-D"] = dict(one=full(one), hsdp=full(m), placements=m[0].weight.placements)

# 4. AdaptiveAdamW: equal scores on matrices of two owners. Three 6×6 matrices (owners 0, 1, 0); 0's gradient
#    has rank 1, 1's and 2's are the same: of a budget of 6, the unit that 1 and 2 tie for goes to 1
def tied_gradients(m):
    gs = [torch.outer(torch.arange(1.0, 7.0), torch.ones(6)), torch.randn(6, 6, generator=torch.Generator().manual_seed(2))]
    for p, g in zip(m.parameters(), [gs[0], gs[1], gs[1]]):
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else g.clone()
def three(shard):
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(6, 6, bias=False) for _ in range(3)])
    for layer in m if shard else ():
        fully_shard(layer)
    opt = la.AdaptiveAdamW([{"params": list(m.parameters()), "rank": 2}], lr=1e-2)
    tied_gradients(m)
    opt.step()
    return opt.ranks(), full(m)
out["tie"] = (three(False), three(True))

# 5. float64 gradients of about 1e100: finite, though their float32 sums (the NaN/Inf check's first pass) overflow
for name in NAMES:
    runs = []
    for m in (model(torch.float64), sharded(model(torch.float64))):
        opt = optimizer(name, m)
        (nn.functional.mse_loss(m(x.double()), y.double()) * 1e100).backward()
        runs.append((refused(opt.step), full(m)))
    out[("huge", name)] = runs

# 6. each rank its own 1-rank mesh (as two pipeline stages have): the collectives of a step and of a load run on
#    the mesh's group, not the world's. A state dict loads; then rank 1's gradient holds a NaN: rank 1 alone refuses
stage = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp"))["dp"]
m = sharded(model(), stage)
opt = optimizer("AdaptiveAdamW", m)
train(m, opt, 2)
opt2 = optimizer("AdaptiveAdamW", m)
res = {"load": refused(lambda: opt2.load_state_dict(copy.deepcopy(opt.state_dict())))}
res["loaded all"] = same(snapshot(m, opt), snapshot(m, opt2))
opt.zero_grad(set_to_none=True)
nn.functional.mse_loss(m(x), y).backward()
if dist.get_rank() == 1:
    m[2].weight.grad.to_local()[0, 0] = float("nan")
res["nan"] = refused(opt.step)
out["stages"] = res

# 7. layers 0 and 2 sharded, 4 and 6 left plain (no fully_shard of theirs or of the root): every rank steps the
#    plain ones in place (the same batch on each rank: their gradients agree), as one process does
#    (AdaptiveAdamW's allocation, which would count a plain matrix once per rank: refused, changing nothing)
for name in ("GaLoreAdamW", "Adapprox", "AdaptiveAdamW"):
    one = model()
    train(one, optimizer(name, one), 4)
    m = model()
    fully_shard(m[0])
    fully_shard(m[2])
    opt = optimizer(name, m)
    before = snapshot(m, opt)
    out[("mixed", name)] = (refused(lambda: train(m, opt, 4)), full(one), full(m),
                            [hasattr(p, "device_mesh") for p in m.parameters()], same(before, snapshot(m, opt)))

# 8. a DTensor weight split otherwise than FSDP2's torch.chunk (rows 2 + 3 of 5, not 3 + 2): refused on every rank
from torch.distributed.tensor import DTensor, Shard
rows = (2, 3)[dist.get_rank()]
uneven = lambda: DTensor.from_local(torch.randn(rows, 4), init_device_mesh("cpu", (2,)), [Shard(0)],
                                    shape=torch.Size([5, 4]), stride=(4, 1))
w = nn.Parameter(uneven())
w.grad = uneven()
out["uneven"] = refused(la.GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2).step)

# 9. a group's rank changed after 2 steps (GaLoreAdamW: 2 -> None; LDAdam: 2 -> 1), as one process refuses it
for name, rank in (("GaLoreAdamW", None), ("LDAdam", 1)):
    runs = []
    for m in (model(), sharded(model())):
        opt = optimizer(name, m)
        train(m, opt, 2)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(m(x), y).backward()
        opt.param_groups[-1]["rank"] = rank
        before = snapshot(m, opt)
        runs.append((refused(opt.step), same(before, snapshot(m, opt))))
    out[("rank changed", name)] = runs
"""


def results_on_two_processes(tmp_path_factory, source, name):
    """``source`` run once under torchrun on 2 gloo processes: each rank's results."""
    tmp_path = tmp_path_factory.mktemp(name)
    run_on_two_processes(tmp_path, source, f"{name}.py")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def fsdp2_small(tmp_path_factory):
    """FSDP2_PATHS, then FSDP2_CHECKPOINTS, on FSDP2_SMALL's model in the same 2 gloo
    processes (one start of torchrun for both): each rank's results."""
    return results_on_two_processes(tmp_path_factory, FSDP2_SMALL + FSDP2_PATHS + FSDP2_CHECKPOINTS + FSDP2_END,
                                    "fsdp2_small")


@pytest.fixture
def fsdp2_paths(fsdp2_small):
    return fsdp2_small


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
@pytest.mark.slow
def test_fsdp2_float64_weights_cross_the_ranks_unrounded(fsdp2_paths, cls):
    # Each matrix's rows travel to its owner and back in one dtype that holds every weight and gradient:
    # float64 ones stay float64. The FSDP2 run then equals one process's far below float32 rounding
    # (measured: bit for bit; with the rows sent as float32, 1e-8 apart).
    r0 = fsdp2_paths[0][(cls.__name__, torch.float64)]
    for one, fsdp2 in zip(r0["one"], r0["fsdp2"]):
        assert fsdp2.dtype == torch.float64
        assert (fsdp2 - one).abs().max() <= 1e-13 * one.abs().max()


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_fsdp2_even_row_counts_split_in_halves_equal_one_process(fsdp2_paths, cls):
    # 8 and 6 rows split 4 + 4 and 3 + 3 (the other FSDP2 tests have odd row counts only), next to 5 rows
    # (3 + 2) and 1 (one rank empty): the ranks assemble each matrix from FSDP2's own row split.
    r0, r1 = (r[(cls.__name__, torch.float32)] for r in fsdp2_paths)
    for one, fsdp2 in zip(r0["one"], r0["fsdp2"]):
        assert (fsdp2 - one).abs().max() <= 1e-6 * one.abs().max()  # measured: equal bit for bit
    assert all(torch.equal(a, b) for a, b in zip(r0["fsdp2"], r1["fsdp2"])) and r0["ranks"] == r1["ranks"]


def test_fsdp2_adaptive_allocation_takes_in_the_rank_with_no_matrix_due(fsdp2_paths):
    # AdaptiveAdamW allocates one budget over every rank's matrices due for a refresh: a rank that owns
    # none (one matrix in all), or none due at this step (refresh gaps 2 and 3: steps 3 and 5 refresh
    # rank 0's matrix alone, step 4 rank 1's), still takes part, and the ranks are one process's.
    for case in ("one matrix", "gaps"):
        r0, r1 = (r[("adaptive", case)] for r in fsdp2_paths)
        for one, fsdp2 in zip(r0["one"], r0["fsdp2"]):
            assert (fsdp2 - one).abs().max() <= 1e-6 * one.abs().max(), case  # measured: equal bit for bit
        assert r0["ranks"][0] == r0["ranks"][1] == r1["ranks"][1], case
        assert (r0["held"], r1["held"]) == (([0], []) if case == "one matrix" else ([2], [0, 4])), case


def test_hsdp_on_a_one_by_two_mesh_equals_one_process(fsdp2_paths):
    # HSDP's 2-D mesh (replicate, shard) with one replica: the shard dimension is the 1-D case
    for r in fsdp2_paths:
        assert [str(p) for p in r["2-D"]["placements"]] == ["R", "S(0)"]  # (Replicate(), Shard(0))
        assert all(torch.equal(a, b) for a, b in zip(r["2-D"]["one"], r["2-D"]["hsdp"]))  # measured: bit for bit


FOUR_PROCESSES = """
import io, os, sys, torch, torch.distributed as dist
from datetime import timedelta
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
import lowrank_adam as la
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=120))

def model():  # rows 8, 6, 5 and 1: within 2 ranks 4+4, 3+3, 3+2, 1+0; on 4 ranks 2+2+2+2, 2+2+2+0, 2+2+1+0, 1+0+0+0
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, 1))

def optimizer(name, m):  # refreshes at steps 1, 4, 7 and 10; Adapprox's ranks move (from k_max 4 or 3)
    if name == "Adapprox":
        return la.Adapprox(m.parameters(), lr=1e-2, weight_decay=0.1, err_tol=0.05, k_max_frac=0.8)
    gap = {} if name == "LDAdam" else {"update_proj_gap": 3}
    return getattr(la, name)(la.lowrank_groups(m, 2, targets=("0", "2", "4"), **gap), lr=1e-2, weight_decay=0.1)

g = torch.Generator().manual_seed(1)
x = torch.randn(16, 5, generator=g)
y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]

def train(m, opt, steps):
    ranks = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        ranks.append(opt.ranks())
    return ranks
"""

# HSDP: 4 gloo processes as a (replicate 2, shard 2) mesh
HSDP_TWO_BY_TWO = FOUR_PROCESSES + """
mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))

def hsdp_model():
    m = model()
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)

out = {}
for name in ["GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox"]:
    one = model()
    one_ranks = train(one, optimizer(name, one), 10)
    m = hsdp_model()
    opt = optimizer(name, m)
    ranks = train(m, opt, 10)
    # a checkpoint after 5 steps (each rank's sharded state dict, as written to disk), loaded into a
    # fresh run that takes the other 5 steps
    part = hsdp_model()
    part_opt = optimizer(name, part)
    train(part, part_opt, 5)
    buf = io.BytesIO()
    torch.save((get_model_state_dict(part), get_optimizer_state_dict(part, part_opt)), buf)
    buf.seek(0)
    weights, state = torch.load(buf, weights_only=False)
    resumed = hsdp_model()
    resumed_opt = optimizer(name, resumed)
    set_model_state_dict(resumed, weights)
    set_optimizer_state_dict(resumed, resumed_opt, state)
    train(resumed, resumed_opt, 5)
    out[name] = dict(one=[p.detach() for p in one.parameters()], hsdp=[p.full_tensor().detach() for p in m.parameters()],
                     ranks=(one_ranks, ranks), states=sum(map(bool, opt.state.values())),
                     resumed=[p.full_tensor().detach() for p in resumed.parameters()])
torch.save(out, f"{sys.argv[2]}/rank{dist.get_rank()}.pt")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_hsdp_on_a_two_by_two_mesh_equals_one_process_and_every_replica_is_identical(tmp_path):
    # 4 gloo processes as a (replicate 2, shard 2) mesh: each replica group steps its matrices on owners
    # inside its shard group, on the same reduced gradients, so the replicas stay equal with no collective
    # between them; 10 steps with refreshes, AdaptiveAdamW's global allocation and Adapprox's moving ranks;
    # and a run resumed at step 5 from the sharded state dicts (get_/set_optimizer_state_dict) ends the same
    run_on_processes(tmp_path, HSDP_TWO_BY_TWO, "hsdp.py", nproc=4)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for name in ("GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox"):
        ones, ranks = results[0][name]["one"], results[0][name]["ranks"]
        assert len({str(r[name]["ranks"]) for r in results}) == 1 and ranks[0] == ranks[1], name
        assert len({str(rs) for rs in ranks[0]}) > 1 or name in ("GaLoreAdamW", "LDAdam"), name  # ranks moved
        for r in results:
            assert all(torch.equal(a, b) for a, b in zip(ones, r[name]["hsdp"])), name  # measured: bit for bit
            assert all(torch.equal(a, b) for a, b in zip(ones, r[name]["resumed"])), name  # resumed at step 5
            assert r[name]["states"] > 0, name


RESHARD = FOUR_PROCESSES + """
FULL = StateDictOptions(full_state_dict=True)
hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
meshes = {"1": None, "2": hsdp["shard"], "4": init_device_mesh("cpu", (4,)), "2x2": hsdp}  # "2": ranks {0,1}, {2,3}

def on(mesh):  # the model, one process's (mesh None) or sharded by FSDP2 on mesh
    m = model()
    if mesh is not None:
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    return m

weights = lambda m: [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in m.parameters()]
out = {}
for name in ["GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox"]:
    one = model()
    one_opt = optimizer(name, one)
    train(one, one_opt, 10)
    res = {"uninterrupted": (weights(one), one_opt.ranks())}
    moves = [("2", "1"), ("1", "2"), ("2", "4"), ("2x2", "2"), ("4", "2")]
    for src, dst in moves + ([("2", "4 dcp")] if name in ("GaLoreAdamW", "LDAdam") else []):
        a = on(meshes[src])
        a_opt = optimizer(name, a)
        train(a, a_opt, 5)
        saved = (get_model_state_dict(a, options=FULL), get_optimizer_state_dict(a, a_opt, options=FULL))
        b = on(meshes[dst.split()[0]])
        b_opt = optimizer(name, b)
        if dst.endswith("dcp"):  # dcp.save of the full state dicts; dcp.load into a fresh run's (same shapes)
            where = os.path.join(sys.argv[2], f"dcp-{name}")
            dcp.save({"model": saved[0], "optim": saved[1]}, checkpoint_id=where)
            into = {"model": get_model_state_dict(b, options=FULL), "optim": get_optimizer_state_dict(b, b_opt, options=FULL)}
            dcp.load(into, checkpoint_id=where)
            saved = (into["model"], into["optim"])
        else:  # written to disk by rank 0 and read back on every rank
            buf = io.BytesIO()
            torch.save(saved, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
        set_model_state_dict(b, saved[0], options=FULL)
        set_optimizer_state_dict(b, b_opt, saved[1], options=FULL)
        whole = [p for g in b_opt.param_groups for p in g["params"] if g.get("rank") is not None or name == "Adapprox"]
        held = sum(1 for p in whole if b_opt.state[p] and "owner" not in b_opt.state[p])  # states on this rank
        train(b, b_opt, 5)
        res[f"{src} -> {dst}"] = (weights(b), b_opt.ranks(), held, len(whole))
    out[name] = res
torch.save(out, f"{sys.argv[2]}/rank{dist.get_rank()}.pt")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_full_state_dict_resumes_on_another_number_of_ranks_as_the_uninterrupted_run(tmp_path):
    # 4 gloo processes. A run of 5 steps on N ranks saves full state dicts (each matrix's state gathered
    # from its owner), which a fresh run on M ranks loads (each rank keeping the states it owns now) and
    # continues for 5 steps: 2 -> 1, 1 -> 2, 2 -> 4, HSDP's 2 x 2 -> 2 and 4 -> 2, through torch.save and,
    # for the optimizers whose state shapes do not depend on the run, dcp.save / dcp.load. Each ends as
    # the uninterrupted 10-step run (one process's, which FSDP2 on any number of ranks equals bit for bit).
    run_on_processes(tmp_path, RESHARD, "reshard.py", nproc=4)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for name in ("GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox"):
        ones, ranks = results[0][name]["uninterrupted"]
        moves = [m for m in results[0][name] if m != "uninterrupted"]
        assert len(moves) == (6 if name in ("GaLoreAdamW", "LDAdam") else 5), moves
        for r in results:
            for move in moves:
                weights, moved_ranks, _, _ = r[name][move]
                assert moved_ranks == ranks, (name, move)
                assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ones, weights)), (name, move)
        for move in moves:  # owners reassigned: each matrix's state on exactly one rank of a run on M ranks
            m = {"1": 1, "2": 2, "4": 4}[move.split("-> ")[1].split()[0]]
            held = [r[name][move][2] for r in results[:m]]
            assert sum(held) == results[0][name][move][3] and (m == 1 or max(held) < sum(held)), (name, move, held)


def test_fsdp2_owners_take_each_groups_matrices_largest_first_and_a_later_group_moves_none(monkeypatch):
    # Owners balance m·n: in parameter order a last large matrix (an LM head after the blocks) would go to
    # the rank that already has the first one (an embedding); largest first puts them on different ranks.
    # A group added later is placed after the earlier groups, whose owners stay.
    monkeypatch.setattr(engine, "_stepped_whole", lambda opt, p, g: g.get("rank") is not None)
    embed, head = nn.Parameter(torch.zeros(64, 8)), nn.Parameter(torch.zeros(64, 8))
    blocks = [nn.Parameter(torch.zeros(8, 8)) for _ in range(6)]
    opt = la.GaLoreAdamW([{"params": [embed, *blocks, head], "rank": 2}], lr=1e-2)
    owner = engine._owner_ranks(opt, 2)
    assert owner[0] != owner[7]  # the two large matrices
    assert sorted(owner.values()).count(0) == 4  # 512 + 3·64 on each rank
    extra = [nn.Parameter(torch.zeros(32, 8)), nn.Parameter(torch.zeros(8, 8))]
    opt.add_param_group({"params": extra, "rank": 2})
    assert {i: r for i, r in engine._owner_ranks(opt, 2).items() if i < 8} == owner


def test_fsdp2_adaptive_ties_between_matrices_of_two_owners_go_to_the_lower_index_as_in_one_process(fsdp2_paths):
    # allocate_ranks gives a tie to the lower index, so the spectra gathered from every rank are put in
    # parameter order, not rank by rank: matrices 1 (rank 1's) and 2 (rank 0's) have the same gradient,
    # and the unit of budget they tie for goes to matrix 1, as in one process.
    for r in fsdp2_paths:
        (one_ranks, one), (ranks, fsdp2) = r["tie"]
        assert one_ranks == ranks == [1, 3, 2]
        assert all(torch.equal(a, b) for a, b in zip(one, fsdp2))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_fsdp2_finite_gradients_whose_float32_sums_overflow_are_stepped(fsdp2_paths, cls):
    # The NaN/Inf check sums each shard in float32 first, then looks at every entry of the shards whose sum
    # is not finite: float64 gradients of about 1e100 are finite, and the step is one process's.
    for r in fsdp2_paths:
        (one_outcome, one), (outcome, fsdp2) = r[("huge", cls.__name__)]
        assert one_outcome == outcome == "loaded"  # (refused's word for: nothing raised)
        for a, b in zip(one, fsdp2):
            assert (a - b).abs().max() <= 1e-13 * a.abs().max()


def test_fsdp2_on_a_mesh_smaller_than_the_world_the_collectives_stay_on_the_mesh(fsdp2_paths):
    # Each rank shards its model on its own 1-rank mesh (two pipeline stages, say): the NaN check and
    # load_state_dict's layout check run on the mesh's group, so a state dict loads on each rank, and a
    # NaN in rank 1's gradient stops rank 1 alone.
    for rank, r in enumerate(fsdp2_paths):
        res = r["stages"]
        assert res["load"] == "loaded" and res["loaded all"], res
        assert res["nan"] == "loaded" if rank == 0 else res["nan"].startswith("NonFiniteGradientError"), res


def test_fsdp2_a_model_with_layers_left_unsharded_equals_one_process(fsdp2_paths):
    # fully_shard on two layers alone: their weights are DTensors, stepped whole on owners (or as shards),
    # the other layers' plain tensors, low-rank or dense, are stepped in place by every rank; the run is one
    # process's (GaLoreAdamW; Adapprox, which steps every DTensor whole)
    for r in fsdp2_paths:
        for name in ("GaLoreAdamW", "Adapprox"):
            outcome, one, fsdp2, sharded, _ = r[("mixed", name)]
            assert outcome == "loaded" and sharded == [True] * 4 + [False] * 4, (name, outcome)
            assert all((a - b).abs().max() <= 1e-6 * a.abs().max() for a, b in zip(one, fsdp2)), name


def test_fsdp2_adaptive_allocation_over_a_plain_matrix_is_refused_on_every_rank(fsdp2_paths):
    # AdaptiveAdamW sums its budget and gathers its spectra over the ranks: a matrix left unsharded is on
    # every rank and would count once per rank, so the ranks would not be one process's. Refused, naming
    # the way out, and nothing changes.
    for r in fsdp2_paths:
        outcome, _, _, _, unchanged = r[("mixed", "AdaptiveAdamW")]
        assert outcome.startswith("NotImplementedError") and "shape (5, 6) is a plain tensor" in outcome, outcome
        assert "allocate=False" in outcome and unchanged


def test_fsdp2_a_weight_split_otherwise_than_torch_chunk_is_refused_on_every_rank(fsdp2_paths):
    # The owner assembles a matrix from FSDP2's row split (torch.chunk: 3 + 2 of 5 rows); a DTensor split
    # 2 + 3 would be put together wrong, so every rank refuses it before any collective of the step
    for r in fsdp2_paths:
        assert r["uneven"].startswith("NotImplementedError") and "expected Shard(0)" in r["uneven"], r["uneven"]


def test_fsdp2_a_groups_rank_changed_after_steps_is_refused_on_every_rank_as_in_one_process(fsdp2_paths):
    # One process refuses a group whose rank went from an integer to None (GaLoreAdamW) or changed at all
    # (LDAdam) after its matrices took steps, before anything changes; so does every FSDP2 rank, the owner
    # of a matrix (its state) and the others (a marker) alike
    for r in fsdp2_paths:
        for name, words in (("GaLoreAdamW", "changed from an integer to None"), ("LDAdam", "changed from 2 to 1")):
            one, fsdp2 = r[("rank changed", name)]
            for outcome, unchanged in (one, fsdp2):
                assert outcome.startswith("ValueError") and words in outcome and unchanged, (name, outcome)


FSDP2_CHECKPOINTS = """
# checkpoints: only the sharded state dicts of as many ranks resume
def trained(name):
    m = sharded(model())
    opt = optimizer(name, m)
    train(m, opt, 3)
    return m, opt

broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
for name in NAMES:
    m, opt = trained(name)  # the uninterrupted run
    buf = io.BytesIO()
    torch.save(get_optimizer_state_dict(m, opt), buf)  # this rank's sharded state dict
    buf.seek(0)
    mine = torch.load(buf, weights_only=False)
    torch.save(mine, os.path.join(sys.argv[2], f"{name}{dist.get_rank()}.pt"))
    dist.barrier()
    rank0s = torch.load(os.path.join(sys.argv[2], f"{name}0.pt"), weights_only=False)  # rank 0's, on every rank
    whole = get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True))
    incomplete = {**whole, "state": {**whole["state"], "2.weight": {"owner": 1}}}  # as one rank's dict would mark it
    one = model()  # one process, the same run
    one_opt = optimizer(name, one)
    train(one, one_opt, 3)
    res = {}
    for how, load in [  # each into an optimizer of the same run, which must not change
            ("broadcast", lambda m, opt: set_optimizer_state_dict(m, opt, whole if dist.get_rank() == 0 else {},
                                                                  options=broadcast)),
            ("full", lambda m, opt: set_optimizer_state_dict(m, opt, whole,
                                                             options=StateDictOptions(full_state_dict=True))),
            ("one_process", lambda m, opt: set_optimizer_state_dict(m, opt, get_optimizer_state_dict(one, one_opt))),
            ("one_process full", lambda m, opt: set_optimizer_state_dict(m, opt, get_optimizer_state_dict(
                one, one_opt), options=StateDictOptions(full_state_dict=True))),  # one process's, resharded
            ("in_one_process", lambda m, opt: set_optimizer_state_dict(m, opt, mine)),  # one rank's, in one process
            ("full in_one_process", lambda m, opt: set_optimizer_state_dict(m, opt, whole)),  # the full one, there
            ("incomplete", lambda m, opt: set_optimizer_state_dict(m, opt, incomplete,  # a marker for one matrix
                                                                   options=StateDictOptions(full_state_dict=True))),
            ("rank 0's", lambda m, opt: set_optimizer_state_dict(m, opt, rank0s))]:  # right on rank 0 alone
        m2, opt2 = (one, one_opt) if how.endswith("in_one_process") else trained(name)
        before = snapshot(m2, opt2)
        res[how] = refused(lambda: load(m2, opt2))
        res[how + " unchanged"] = same(before, snapshot(m2, opt2))
    # set_state_dict (weights and optimizer together), broadcast from rank 0: refused as well
    model_sd, optim_sd = get_state_dict(m, opt, options=StateDictOptions(full_state_dict=True))
    m2, opt2 = trained(name)
    before = snapshot(m2, opt2)
    rank0 = dist.get_rank() == 0
    res["set_state_dict"] = refused(lambda: set_state_dict(m2, opt2, model_state_dict=model_sd if rank0 else {},
                                                           optim_state_dict=optim_sd if rank0 else {},
                                                           options=broadcast))
    res["set_state_dict unchanged"] = same(before, snapshot(m2, opt2))
    # the state dict of an optimizer that has not stepped (no state at all) loads
    res["before any step"] = refused(lambda: optimizer(name, m2).load_state_dict(optimizer(name, m2).state_dict()))
    # a fresh optimizer (without gradients, torch first steps it with lr 0): refused too; then this rank's
    # sharded state dict resumes exactly
    m2, opt2 = trained(name)
    opt2.zero_grad(set_to_none=True)
    opt2 = optimizer(name, m2)
    res["fresh"] = refused(lambda: set_optimizer_state_dict(m2, opt2, whole if dist.get_rank() == 0 else {},
                                                            options=broadcast))
    res["fresh lr"] = [g["lr"] for g in opt2.param_groups]
    set_optimizer_state_dict(m2, opt2, mine)
    train(m, opt, 3)
    train(m2, opt2, 3)
    res["resumed"], res["uninterrupted"] = full(m2), full(m)
    out[("checkpoint", name)] = res

# no low-rank group: every state is a dense parameter's, sharded like it, so a full state dict restores it
def dense():
    m = sharded(model())
    return m, la.GaLoreAdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
m, opt = dense()
train(m, opt, 3)
whole = get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True))
m2, opt2 = dense()
m2.load_state_dict(m.state_dict())
res = refused(lambda: set_optimizer_state_dict(m2, opt2, whole, options=StateDictOptions(full_state_dict=True)))
m3, opt3 = dense()  # the same full state dict broadcast from rank 0: no low-rank state to miss, so it loads too
m3.load_state_dict(m.state_dict())
res3 = refused(lambda: set_optimizer_state_dict(m3, opt3, whole if dist.get_rank() == 0 else {}, options=broadcast))
train(m, opt, 3)
train(m2, opt2, 3)
train(m3, opt3, 3)
out["dense"] = (res, full(m), full(m2))
out["dense broadcast"] = (res3, full(m), full(m3))

# an owner marker for a weight this run steps as a dense shard: 2.weight low-rank (its owner rank 1) when
# saved, dense when loaded (same group sizes); rank 0's sharded state dict, given to both ranks, holds
# a marker for it and no whole tensor: refused on every rank, naming the marker, and nothing changes
def two_matrices(m, rank):
    rest = [p for n, p in m.named_parameters() if n not in ("0.weight", "2.weight")]
    return la.GaLoreAdamW([{"params": [m[0].weight], "rank": 2}, {"params": [m[2].weight], "rank": rank},
                           {"params": rest}], lr=1e-2)
m = sharded(model())
opt = two_matrices(m, 2)
train(m, opt, 2)
torch.save(get_optimizer_state_dict(m, opt), os.path.join(sys.argv[2], f"marker{dist.get_rank()}.pt"))
dist.barrier()
rank0s = torch.load(os.path.join(sys.argv[2], "marker0.pt"), weights_only=False)
m2 = sharded(model())
opt2 = two_matrices(m2, None)
train(m2, opt2, 1)
before = snapshot(m2, opt2)
out["dense marker"] = (refused(lambda: set_optimizer_state_dict(m2, opt2, rank0s)), same(before, snapshot(m2, opt2)))

"""


@pytest.fixture
def fsdp2_checkpoints(fsdp2_small):
    return fsdp2_small


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_fsdp2_state_dict_of_another_world_size_or_rank_is_refused_at_load_on_every_rank(fsdp2_checkpoints, cls):
    # A sharded state dict holds the low-rank states of one rank's matrices and markers for the rest.
    # One rank's, loaded in one process, is refused when loaded (not by a later step), and nothing changes.
    # Rank 0's loaded on both ranks fits rank 0 alone: both refuse (the ranks compare what they were
    # given), so no rank loads while another refuses. One process's, given to the sharded loader, holds
    # whole tensors for sharded states: refused, naming the full loader, which takes it (Adapprox, which
    # shards no state, takes it there: the same run's state comes back).
    for r in fsdp2_checkpoints:
        res = r[("checkpoint", cls.__name__)]
        assert res["rank 0's"].startswith("ValueError") and "rank that steps its matrix" in res["rank 0's"]
        assert "on any rank" in res["rank 0's"], res["rank 0's"]
        assert res["in_one_process"].startswith("ValueError") and "written by one rank of an FSDP2 run" in \
            res["in_one_process"], res["in_one_process"]
        if cls is la.Adapprox:  # it steps every parameter whole on an owner: no state is sharded, so loads
            assert res["one_process"] == "loaded", res["one_process"]
        else:
            assert res["one_process"].startswith("ValueError") and "whole tensors" in res["one_process"]
            assert "full_state_dict=True" in res["one_process"] and "on any rank" in res["one_process"]
        for how in ("rank 0's", "in_one_process"):
            assert "get_optimizer_state_dict" in res[how] and "full_state_dict=True" in res[how], res[how]
        for how in ("one_process", "rank 0's", "in_one_process"):
            assert res[how + " unchanged"], how


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_fsdp2_full_state_dicts_move_between_one_process_and_two_ranks(fsdp2_checkpoints, cls):
    # A full state dict holds every matrix's state, gathered from its owner: FSDP2's loads in one process
    # and one process's on 2 ranks (each rank keeps the states it owns), and either gives back the state
    # of the same run, bit for bit (one process and FSDP2 step alike).
    for r in fsdp2_checkpoints:
        res = r[("checkpoint", cls.__name__)]
        for how in ("one_process full", "full in_one_process"):
            assert res[how] == "loaded" and res[how + " unchanged"], (how, res[how])
        # a full state dict that lacks one matrix's state (a marker in its place) is not loaded with that
        # matrix's state restarted: torch's loader already stops at the key its pattern lacks, and nothing changes
        assert res["incomplete"] != "loaded" and "2.weight" in res["incomplete"] and res["incomplete unchanged"]
    assert fsdp2_checkpoints[0][("checkpoint", cls.__name__)]["rank 0's"] == \
        fsdp2_checkpoints[1][("checkpoint", cls.__name__)]["rank 0's"]  # the same message on every rank


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_fsdp2_full_state_dict_load_is_refused_on_every_rank_and_changes_nothing(fsdp2_checkpoints, cls):
    # torch's one-file pattern (full_state_dict=True, rank 0's dict broadcast) cannot restore the low-rank
    # states: rank 0 holds only the matrices it owns, and every other rank would get its own current state
    # back. Every rank must refuse, naming the paths that work, and change nothing; those paths then resume.
    for r in fsdp2_checkpoints:
        res = r[("checkpoint", cls.__name__)]
        for how in ("broadcast", "fresh", "set_state_dict"):
            assert res[how].startswith("ValueError") and "full state dict" in res[how], (how, res[how])
            assert "get_optimizer_state_dict" in res[how] and "dcp.load" in res[how], res[how]
        assert res["broadcast unchanged"] and res["full unchanged"]  # weights, state, options: bit for bit
        assert res["set_state_dict unchanged"]
        # each rank given the full state dict it wrote itself (its own matrices' states in place, as
        # train_tiny_llama.py --fsdp gathers them): not refused, and the same run's state comes back
        assert res["full"] == "loaded", res["full"]
        assert res["fresh lr"] == [1e-2] * len(res["fresh lr"])  # torch's lr-0 step left no trace in the options
        assert all(torch.equal(a, b) for a, b in zip(res["resumed"], res["uninterrupted"]))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_fsdp2_the_state_dict_of_an_optimizer_that_has_not_stepped_loads(fsdp2_checkpoints, cls):
    # no rank holds a state of any matrix yet: nothing is missing from its owner
    for r in fsdp2_checkpoints:
        assert r[("checkpoint", cls.__name__)]["before any step"] == "loaded"


def test_fsdp2_full_state_dict_of_dense_parameters_alone_resumes_exactly(fsdp2_checkpoints):
    # Only the low-rank states make a full state dict unusable; without a low-rank group every state is
    # a dense parameter's, sharded like it, and the full state dict resumes exactly.
    for r in fsdp2_checkpoints:
        outcome, uninterrupted, resumed = r["dense"]
        assert outcome == "loaded"
        assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))


def test_fsdp2_a_full_state_dict_of_dense_parameters_alone_broadcast_from_rank_0_resumes_exactly(fsdp2_checkpoints):
    # The broadcast from rank 0 is refused for what it loses of the low-rank states; with none (no low-rank
    # group) torch's one-file pattern loads and the run resumes exactly
    for r in fsdp2_checkpoints:
        outcome, uninterrupted, resumed = r["dense broadcast"]
        assert outcome == "loaded", outcome
        assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))


def test_fsdp2_an_owner_marker_for_a_weight_now_stepped_as_a_dense_shard_is_refused_on_every_rank(fsdp2_checkpoints):
    # a sharded state dict with a marker {"owner": 1} for 2.weight, low-rank when saved, dense in the run
    # that loads it: the marker holds no state for that rank's shard; refused before any rank loads
    for r in fsdp2_checkpoints:
        outcome, unchanged = r["dense marker"]
        assert outcome.startswith("ValueError") and "rank 0 has an owner marker for the parameter of shape (6, 8) " \
            "(index 1), which every rank steps on its own shard" in outcome, outcome
        assert unchanged


# -- found by a mutation hunt: AdaptiveAdamW, LDAdam and Adapprox --


@pytest.mark.parametrize("rank_init, k_min, expected", [(7, 1, [7, 3, 1, 1]), (5, 3, [5, 3, 3, 3])])
def test_adapprox_first_descent_halves_rounding_down_and_stops_at_k_min(rank_init, k_min, expected):
    # An exact V (G² of rank 1, ξ ≈ 0) descends by k ← max(k_min, min(k - 1, ⌊k/2⌋)) each step:
    # 7 -> 3 (⌊7/2⌋, not ⌈7/2⌉ = 4) -> 1; from 5 with k_min = 3: ⌊5/2⌋ = 2 is below k_min, so 3,
    # and ranks() never reports a rank outside [k_min, k_max]
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(12, 16, generator=g, dtype=torch.float64))
    G = (torch.rand(12, 1, generator=g, dtype=torch.float64) + 0.5) @ (
        torch.rand(1, 16, generator=g, dtype=torch.float64) + 0.5)
    opt = la.Adapprox([p], lr=1e-3, k_max_frac=1.0, rank_init=rank_init, k_min=k_min)
    history = [opt.ranks()[0]]
    for _ in range(3):
        p.grad = G.clone()
        opt.step()
        history.append(opt.ranks()[0])
    assert history == expected


def test_adapprox_float32_factors_step_a_gradient_near_the_float32_maximum():
    # ``factor_dtype="float32"``: V is formed at scale 4^-h, h = ⌊log2 max|G|⌋ clamped to ±126, so a
    # finite gradient of about 2^127 squares to about 1, not to inf; the steps equal the float64 reference
    # (k + oversample covers the short side: the sketch spans everything, whatever Ω's dtype)
    g = torch.Generator().manual_seed(0)
    grads = [(G := torch.randn(6, 5, generator=g, dtype=torch.float64)) / G.abs().max() * 1.5 * 2.0**127
             for _ in range(3)]  # max |G| = 1.5·2^127: h = 127, clamped to 126
    assert all(bool(torch.isfinite(G.float()).all()) for G in grads)
    opts = dict(lr=1.0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, k_max_frac=0.5, rank_init=None, err_tol=0.0,
                err_beta=0.9, oversample=5, power_iters=1, warm_start=True, nonneg="abs", clip_threshold=1.0,
                seed=0, factor_dtype="float32")
    expected, ranks, _ = adapprox_reference_for(opts, torch.zeros(6, 5, dtype=torch.float64), grads, 2)
    assert ranks == [2, 2, 2]
    p = nn.Parameter(torch.zeros(6, 5))
    opt = la.Adapprox([p], **opts)
    for G in grads:
        p.grad = G.float()
        opt.step()
    assert opt.state[p]["u_exp"] == 126
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-4, atol=1e-6)


def test_adapprox_floor_rule_is_taken_in_the_row_column_scaled_units():
    # ``nonneg="floor"`` with ``row_col_scaling``: V̂ = diag(r) max(Q Uᵀ, (1-β2)·G²/(r cᵀ)) diag(c), the floor
    # divided by the same scales as N; a rank-1 factorization of a full-rank V leaves it binding at many entries
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(8, 6, generator=g, dtype=torch.float64)
    grads = [torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    opts = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, k_max_frac=0.2, rank_init=None, err_tol=0.5,
                err_beta=0.9, oversample=2, power_iters=1, warm_start=True, nonneg="floor", clip_threshold=None,
                seed=3)
    expected, ranks, _ = adapprox_reference_for(opts, W0, grads, 1)
    abs_rule, _, _ = adapprox_reference_for({**opts, "nonneg": "abs"}, W0, grads, 1)
    assert ranks == [1, 1, 1] and not torch.allclose(expected, abs_rule)  # the floor binds
    p = nn.Parameter(W0.clone())
    opt = la.Adapprox([p], **opts)
    for G in grads:
        p.grad = G.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), expected, atol=1e-9, rtol=1e-9)


# -- one class copied out alone: the shared core plus its section ------------

BANNER = re.compile(r"^# =+\n# (\d)\. [^\n]*\n# =+\n", re.M)


def copy_out_source(cls_name):
    """The file a user gets by copying the module's shared core (everything
    before section 3), the section that defines ``cls_name``, and each other
    section whose definitions that section uses (section 3, the subspace
    pieces, for the two GaLore classes)."""
    source = Path(la.__file__).read_text()
    marks = list(BANNER.finditer(source))
    starts = {int(m.group(1)): m.start() for m in marks}
    ends = {int(m.group(1)): (marks[i + 1].start() if i + 1 < len(marks) else len(source)) for i, m in enumerate(marks)}
    text = {k: source[starts[k]:ends[k]] for k in starts if k >= 3}
    own = next(k for k in text if f"\nclass {cls_name}(" in text[k])
    defined = {k: set(re.findall(r"^(?:def|class) (\w+)|^([A-Z_]+) =", text[k], re.M)) for k in text}
    defined = {k: {a or b for a, b in v} for k, v in defined.items()}
    used = global_names(compile(text[own], "section", "exec"))  # the names its code reads, not its prose
    needed = [k for k in text if k == own or defined[k] & used]
    return source[:starts[3]] + "".join(text[k] for k in sorted(needed))


COPY_OUT_SCRIPT = """
import importlib, sys, torch
from torch import nn
sys.path.insert(0, sys.argv[1])
for name, kwargs in {runs}:
    Optimizer = getattr(importlib.import_module("one_class_" + name), name)  # that file alone, never lowrank_adam
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 1))
    hidden = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
    opt = Optimizer([{{"params": rest, "rank": None}}, {{"params": hidden, "rank": 3}}], **kwargs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], f"{{sys.argv[1]}}/{{name}}.pt")
    # without lowrank_engine: the short refusals, and layer-wise steps name the missing file
    sd = opt.state_dict()
    for call, error, words in [
            (lambda: Optimizer([{{"params": hidden, "rank": 3, "rnk": 3}}], **kwargs), ValueError,
             "has no group option 'rnk'. Its group options:"),
            (lambda: opt.load_state_dict({{**sd, "param_groups": [{{**g, "rnk": 3}} for g in sd["param_groups"]]}}),
             ValueError, "written by another optimizer"),
            (lambda: opt.step_parameter(hidden[0]), RuntimeError, "lowrank_engine.py")]:
        try:
            call()
        except error as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(words)
"""


def copy_out_kwargs(cls):
    return dict(lr=1e-2, **({"update_proj_gap": 2} if "update_proj_gap" in inspect.signature(cls).parameters else {}))


@pytest.fixture(scope="module")
def copied_out_weights(tmp_path_factory):
    """Each class copied out with the core alone, one file per class, each trained in
    one fresh interpreter (one for all four) where neither lowrank_adam nor
    lowrank_engine can be imported (so the short refusals are checked there too):
    the folder with each class's final weights."""
    tmp_path = tmp_path_factory.mktemp("copied_out")
    for cls in OPTIMIZERS:
        (tmp_path / f"one_class_{cls.__name__}.py").write_text(copy_out_source(cls.__name__))
    script = tmp_path / "run.py"
    script.write_text(COPY_OUT_SCRIPT.format(runs=[(cls.__name__, copy_out_kwargs(cls)) for cls in OPTIMIZERS]))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)  # lowrank_adam not importable
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
@pytest.mark.slow
def test_one_class_copied_out_with_the_core_alone_trains_as_the_module_does(cls, copied_out_weights):
    code = copy_out_source(cls.__name__)
    readme = Path(ROOT, "README.md").read_text()
    at_most = int(re.search(r"one\s+class\s+takes\s+at\s+most\s+([\d,]+)\s+lines", readme).group(1).replace(",", ""))
    assert len(code.splitlines()) <= at_most  # the length the README promises
    others = [c.__name__ for c in OPTIMIZERS if c is not cls]
    assert not any(f"class {name}(" in code for name in others)
    # the same run with the whole module
    copied = torch.load(copied_out_weights / f"{cls.__name__}.pt", weights_only=True)
    for a, b in zip(copy_out_run(cls, cls), copied):
        assert torch.equal(a, b)


def copy_out_run(Optimizer, cls):
    """The copy-out script's run (COPY_OUT_SCRIPT) with ``Optimizer``, in this process: the final weights."""
    torch.manual_seed(0)
    model = mlp()
    hidden = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
    opt = Optimizer([{"params": rest, "rank": None}, {"params": hidden, "rank": 3}], **copy_out_kwargs(cls))
    train(model, opt, 6, regression_data())
    return [p.detach() for p in model.parameters()]


def global_names(code):
    """Every global name a module's code (functions and methods included) reads."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const)
    return names


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_one_class_copied_out_defines_every_name_its_code_uses(cls):
    # The training run above takes one path through the class (default options);
    # a helper used only by another option (GaLore's random or GHA subspace,
    # AdaptiveAdamW without the momentum transformation) and left in another
    # section would fail only when that option is used. So: every global name
    # the copied code reads is defined in it, or is a builtin.
    code = compile(copy_out_source(cls.__name__), "one_class.py", "exec")
    namespace = {"__name__": "one_class"}
    exec(code, namespace)
    undefined = sorted(n for n in global_names(code) if n not in namespace and not hasattr(builtins, n))
    assert undefined == []


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_bench_copyout_measures_the_copy_the_readme_describes_and_the_smallest_that_works(cls):
    # DESIGN.md's copy-out table comes from `python bench.py copyout`. Its "by sections" copy
    # is the one this file builds on its own (copy_out_source); its "by definitions" copy,
    # the smallest, must be a working copy: every name it reads is defined in it, and it
    # trains bit for bit as the module does.
    import bench
    assert bench.copy_out(cls.__name__) == copy_out_source(cls.__name__)
    least = bench.copy_out(cls.__name__, "definitions")
    assert len(least.splitlines()) < len(copy_out_source(cls.__name__).splitlines())
    code = compile(least, "least.py", "exec")
    module = types.ModuleType("least")
    exec(code, module.__dict__)
    assert sorted(n for n in global_names(code) if n not in module.__dict__ and not hasattr(builtins, n)) == []
    others = [c.__name__ for c in OPTIMIZERS if c is not cls]
    assert not any(hasattr(module, name) for name in others)
    for a, b in zip(copy_out_run(cls, cls), copy_out_run(getattr(module, cls.__name__), cls)):
        assert torch.equal(a, b)
    rows = bench.copyout(["--optimizer", cls.__name__]).splitlines()
    design = Path(ROOT, "docs", "DESIGN.md").read_text()
    assert rows[2] in design  # the figures DESIGN gives are today's
    assert rows[2].startswith(f"| {cls.__name__} | {len(copy_out_source(cls.__name__).splitlines())} | "
                              f"{len(least.splitlines())} | ")

def test_the_readme_map_names_tests_that_exist():
    # the map at the top of this file: every test it names is defined (here, or in
    # test_train_tiny_llama.py where it says "train::")
    source = Path(__file__).read_text()
    block = source[source.index("# What README.md promises"):source.index("\nimport builtins\n")]
    named = re.findall(r"(train::)?\b(test_\w+)\b(?!\.py)", block)
    assert len(named) > 50
    here = set(re.findall(r"^def (test_\w+)", source, re.M))
    there = set(re.findall(r"^def (test_\w+)", Path(ROOT, "test_train_tiny_llama.py").read_text(), re.M))
    assert [name for train_, name in named if name not in (there if train_ else here)] == []


def test_the_helpers_section_copied_out_with_the_core_alone_defines_every_name_its_code_uses():
    # The README: section 8's helpers (lowrank_groups, state_bytes) need only the core, as each
    # optimizer's section does
    source = Path(la.__file__).read_text()
    marks = list(BANNER.finditer(source))
    helpers = next(i for i, m in enumerate(marks) if m.group(1) == "8")
    end = marks[helpers + 1].start() if helpers + 1 < len(marks) else len(source)
    code = compile(source[:marks[2].start()] + source[marks[helpers].start():end], "helpers.py", "exec")
    namespace = {"__name__": "helpers"}
    exec(code, namespace)
    assert [m.group(1) for m in marks[:3]] == ["1", "2", "3"]  # (the core: everything before section 3)
    assert {"lowrank_groups", "state_bytes"} <= namespace.keys()
    assert sorted(n for n in global_names(code) if n not in namespace and not hasattr(builtins, n)) == []


# -- any 2-D weight can be targeted: Hugging Face GPT-2, packed projections --

def tiny_gpt2(seed=0):
    """A real Hugging Face GPT-2 from a tiny config: nothing is downloaded.
    Its attention and MLP weights are ``Conv1D`` modules, stored in×out."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, loss_type="ForCausalLM",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: runs are repeatable
    return GPT2LMHeadModel(config)


@pytest.mark.slow
def test_lowrank_groups_selects_hugging_face_gpt2_conv1d_weights_and_not_its_embeddings(capsys):
    model = tiny_gpt2()
    groups = la.lowrank_groups(model, 4, verbose=True)
    dense, lowrank = groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in lowrank["params"]) == sorted(
        f"transformer.h.{i}.{part}.weight" for i in (0, 1) for part in ("attn.c_attn", "attn.c_proj",
                                                                        "mlp.c_fc", "mlp.c_proj"))
    assert model.transformer.h[0].attn.c_attn.weight.shape == (16, 48)  # Conv1D: in×out
    assert lowrank["rank"] == 4 and dense["rank"] is None
    assert len(dense["params"]) + len(lowrank["params"]) == len(list(model.parameters()))
    # the embeddings (and the LM head tied to wte) stay dense unless asked for
    assert model.lm_head.weight is model.transformer.wte.weight
    assert id(model.transformer.wte.weight) in {id(p) for p in dense["params"]}
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("lowrank_groups: 8 matrices at rank 4: transformer.h.0.attn.c_attn.weight 16×48")
    assert out[0].endswith("... (2 more)") and out[1].startswith("lowrank_groups: 20 dense parameters: ")
    named = la.lowrank_groups(model, 4, targets=("h.", "wte"))[1]["params"]  # named, but not asked for
    assert len(named) == 8 and all(p is not model.transformer.wte.weight for p in named)
    asked = la.lowrank_groups(model, 4, targets=("h.", "wte"), embeddings=True)[1]["params"]
    assert any(p is model.transformer.wte.weight for p in asked) and len(asked) == 9


def test_lowrank_groups_selects_packed_projections():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    dense, lowrank = la.lowrank_groups(layer, 2, targets=("self_attn", "linear"))
    assert [p.shape for p in lowrank["params"]] == [(24, 8), (8, 8), (16, 8), (8, 16)]
    assert lowrank["params"][0] is layer.self_attn.in_proj_weight  # Q, K, V stacked: one matrix
    assert all(p.dim() == 1 for p in dense["params"])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_hugging_face_gpt2_trains_and_resumes_exactly(cls, tmp_path):
    opts = {"GaLoreAdamW": dict(update_proj_gap=2), "AdaptiveAdamW": dict(update_proj_gap=2),
            "LDAdam": {}, "Adapprox": {}}[cls.__name__]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(2)] * 3  # two batches to learn

    def run(model, opt, steps):
        losses = []
        for x in steps:
            opt.zero_grad(set_to_none=True)
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    model = tiny_gpt2()
    opt = cls(la.lowrank_groups(model, 4, **opts), lr=1e-2)
    losses = run(model, opt, batches)
    assert losses[-1] < losses[0] - 0.05  # it learns
    # the selected Conv1D weights carry the low-rank state, the rest a dense one
    c_attn = model.transformer.h[0].attn.c_attn.weight
    low = {"GaLoreAdamW": "P", "AdaptiveAdamW": "P", "LDAdam": "P", "Adapprox": "Q"}[cls.__name__]
    assert low in opt.state[c_attn] and low not in opt.state[model.transformer.wte.weight]
    if cls is la.Adapprox:
        assert opt.state[c_attn]["rank"] <= 4  # the group's rank caps the adaptive rank
    # interrupted after 3 steps, saved, loaded into a fresh model and optimizer
    model = tiny_gpt2()
    opt = cls(la.lowrank_groups(model, 4, **opts), lr=1e-2)
    run(model, opt, batches[:3])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = tiny_gpt2(seed=5)
    model.load_state_dict(saved["model"])
    opt = cls(la.lowrank_groups(model, 4, **opts), lr=1e-2)
    opt.load_state_dict(saved["opt"])
    assert run(model, opt, batches[3:]) == losses[3:]


def test_adapprox_takes_the_same_selection_rank_caps_and_none_is_dense():
    torch.manual_seed(0)
    model = nn.ModuleDict({"mlp": nn.Linear(12, 20), "head": nn.Linear(20, 16)})
    groups = la.lowrank_groups(model, 5, targets=("mlp",))
    opt = la.Adapprox(groups, lr=1e-2, err_tol=0.0, clip_threshold=None)
    head = model["head"].weight.detach().clone().requires_grad_()
    ref = torch.optim.AdamW([head], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape)
        head.grad = model["head"].weight.grad.clone()
        opt.step()
        ref.step()
    assert opt.ranks() == [5]  # only the selected matrix is factored, at most at the group's rank
    assert set(opt.state[model["mlp"].weight]) >= {"Q", "U"}
    assert "Q" not in opt.state[model["head"].weight]  # rank None: AdamW's dense V, and AdamW's update
    torch.testing.assert_close(model["head"].weight, head, rtol=0, atol=1e-6)
    # a group without "rank" factors every matrix, as in the paper (k_max = ⌊k_max_frac · min side⌋)
    assert la.Adapprox(model.parameters(), k_max_frac=0.5).ranks() == [6, 8]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="Invalid rank"):
            la.Adapprox([{"params": [model["mlp"].weight], "rank": bad}])


def switch_then_step(cls, option, old, new, steps=3, **kw):
    """Steps with ``option=old``, then switches it to ``new`` in the group and
    steps once more; returns (optimizer, model, state dict before the switch)."""
    torch.manual_seed(0)
    model = mlp()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls, **kw, **{option: old}))
    data = regression_data()
    train(model, opt, steps, data)
    before = copy.deepcopy(opt.state_dict())
    for group in opt.param_groups:
        group[option] = new
    train(model, opt, 1, data)
    return opt, model, before


@pytest.mark.parametrize("cls, option, old, new, created", [
    (la.GaLoreAdamW, "residual", False, True, "rms"),
    (la.AdaptiveAdamW, "residual", False, True, None),
    (la.LDAdam, "error_feedback", False, True, "error"),
    (la.Adapprox, "betas", (0.0, 0.999), (0.9, 0.999), "exp_avg"),
], ids=["galore-residual", "adaptive-residual", "ldadam-error-feedback", "adapprox-first-moment"])
def test_an_option_switched_on_between_steps_starts_its_state_at_zero(cls, option, old, new, created):
    # The switched step equals a step of an optimizer built with the option on,
    # loaded with the state from before the switch plus the new buffer at zero
    # (the residual's limiter: RMS history 0, i.e. no limit on this step).
    opt, model, before = switch_then_step(cls, option, old, new)
    torch.manual_seed(0)
    ref_model = mlp()
    ref = cls(mlp_groups(ref_model, cls=cls), **kwargs_for(cls, **{option: old}))
    train(ref_model, ref, 3, regression_data())
    for group in ref.param_groups:
        group[option] = new
    for p in ref.state:
        st_ = ref.state[p]
        if created == "rms" and "P" in st_:
            st_["rms"] = torch.zeros(())
        elif created == "error" and "P" in st_:
            st_["error"] = torch.zeros((p.T if p.shape[0] > p.shape[1] else p).shape)
        elif created == "exp_avg":
            st_["exp_avg"] = torch.zeros_like(p)
    train(ref_model, ref, 1, regression_data())
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    if created:
        holders = [st_ for st_ in opt.state.values() if "P" in st_ or created == "exp_avg"]
        assert holders and all(created in st_ for st_ in holders)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_galore_rank_changed_between_steps_takes_effect_at_the_next_refresh():
    """A group's rank raised (2 → 4) or lowered (4 → 1) between steps: the basis
    keeps its rank until the next refresh, then takes the new one; the moments,
    kept in place, keep their first min(r_old, r_new) rows (new rows start at 0)."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(6, 10, generator=g, dtype=torch.float64))
    opt = la.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 3}], lr=1e-2, betas=(0.9, 0.99))
    for t, rank in zip(range(1, 8), [2, 2, 4, 4, 4, 1, 1]):
        opt.param_groups[0]["rank"] = rank
        p.grad = torch.randn(6, 10, generator=g, dtype=torch.float64)
        m_before = opt.state[p].get("exp_avg")
        opt.step()
        assert opt.ranks() == [{1: 2, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1}[t]]
        assert opt.state[p]["P"].shape[1] == opt.state[p]["exp_avg"].shape[0] == opt.ranks()[0]
        if t in (4, 7):  # the refreshes: the moments were resized in place, then updated with R
            r = opt.ranks()[0]
            kept = torch.zeros(r, 10, dtype=torch.float64)
            kept[:min(r, m_before.shape[0])] = m_before[:r]
            torch.testing.assert_close(opt.state[p]["exp_avg"], 0.9 * kept + 0.1 * (opt.state[p]["P"].T @ p.grad))


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW, la.LDAdam], ids=ids)
@pytest.mark.parametrize("old, new", [(3, None), (None, 3)], ids=["int-to-None", "None-to-int"])
def test_a_rank_switched_between_int_and_none_is_refused_before_any_change(cls, old, new):
    """A basis and projected moments cannot become AdamW's full moments, or the
    reverse: the step is refused, naming the change, and nothing moves."""
    model = mlp()
    lowrank, rest = mlp_groups(model)[1]["params"], mlp_groups(model)[0]["params"]
    opt = cls([{"params": rest}, {"params": lowrank, "rank": old}], **kwargs_for(cls))
    data = regression_data()
    train(model, opt, 2, data)
    opt.param_groups[1]["rank"] = new
    before = snapshot(opt, model)
    with pytest.raises(ValueError, match=f"changed from .* to {new if new else 'None'} after it took steps"):
        train(model, opt, 1, data)
    assert_same_state(before[0], opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before[1], model.parameters()))


def test_ldadam_rank_changed_between_steps_is_refused_before_any_change():
    model = mlp()
    opt = la.LDAdam(mlp_groups(model, rank=3), **kwargs_for(la.LDAdam))
    data = regression_data()
    train(model, opt, 2, data)
    opt.param_groups[1]["rank"] = 2
    before = snapshot(opt, model)
    with pytest.raises(ValueError, match="changed from 3 to 2 after it took steps"):
        train(model, opt, 1, data)
    assert all(torch.equal(a, b) for a, b in zip(before[1], model.parameters()))


def adapprox_run(ranks, steps=6, k_min=1, err_tol=0.5):
    """Adapprox on one 9×6 matrix, its group's rank set before each step to ``ranks[t]``."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(9, 6, generator=g))
    opt = la.Adapprox([{"params": [p], "rank": ranks[0]}], lr=1e-2, clip_threshold=None, k_min=k_min,
                      err_tol=err_tol)
    for t in range(steps):
        opt.param_groups[0]["rank"] = ranks[min(t, len(ranks) - 1)]
        p.grad = torch.randn(9, 6, generator=g)
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("switch", ["None-to-int", "int-to-None"])
def test_adapprox_rank_switched_between_int_and_none_carries_v_over(switch):
    """At full rank (6 on a 9×6 matrix) Adapprox keeps V dense and exact, so a
    run switched between rank=None (dense V) and rank=6 at step 3 follows the run
    that never switched; a factored V (rank 2) switched to dense is its
    reconstruction diag(row) Q Uᵀ diag(col) at its scale (the steps before and
    after the switch: V in float64 or float32, hence the tolerance)."""
    ranks = [None, None, None, 6] if switch == "None-to-int" else [6, 6, 6, None]
    switched, opt = adapprox_run(ranks, k_min=6)  # k_min = 6: held at full rank
    steady, _ = adapprox_run([ranks[-1]], k_min=6)
    torch.testing.assert_close(switched, steady, atol=1e-6, rtol=1e-5)
    assert opt.ranks() == ([6] if switch == "None-to-int" else [])
    if switch == "int-to-None":
        _, opt = adapprox_run([2], steps=5)
        p = opt.param_groups[0]["params"][0]
        st_ = opt.state[p]
        V = (st_["Q"] * st_["row"][:, None]) @ (st_["U"] * st_["col"][:, None]).T * 4.0 ** st_["u_exp"]
        assert (V < 0).any()  # the rank-2 reconstruction undershoots zero somewhere: Adam's V may not
        opt.param_groups[0]["rank"] = None
        opt._convert_second_moment(p, opt.param_groups[0])
        assert "Q" not in st_ and "rank" not in st_
        torch.testing.assert_close(st_["exp_avg_sq"], V.clamp_min(0).float())


@pytest.mark.parametrize("err_tol", [0.0, 10.0], ids=["held", "halved"])
def test_adapprox_dense_v_switched_to_a_rank_starts_as_a_fresh_factored_v(err_tol):
    """A dense V (rank=None) switched to rank=3, below the 9×6 matrix's full
    rank, is factored from the next step as a fresh factored V is: at k_max,
    in its initial descent. So the ranks from the switch on are those of a
    run factored at rank 3 from its first step (err_tol = 0: held at k_max;
    10: halved at once, not stepped down by rank_step)."""
    def rank_history(ranks):
        g = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn(9, 6, generator=g))
        opt = la.Adapprox([{"params": [p], "rank": ranks[0]}], lr=1e-2, err_tol=err_tol)
        history = []
        for rank in ranks:
            opt.param_groups[0]["rank"] = rank
            p.grad = torch.randn(9, 6, generator=g)
            opt.step()
            history.append(opt.ranks())
        return history

    assert rank_history([None, None, 3, 3, 3]) == [[], []] + rank_history([3, 3, 3])


def test_adapprox_rank_cap_lowered_between_steps_holds_at_the_next_step():
    _, opt = adapprox_run([5, 5, 2], steps=3, err_tol=0.0)  # err_tol = 0: the rank holds at its cap
    p = opt.param_groups[0]["params"][0]
    assert opt.ranks() == [2] and opt.state[p]["Q"].shape[1] == 2  # step 3 factored at rank 2, not 5


def test_options_switched_off_free_their_buffers():
    opt, _, _ = switch_then_step(la.LDAdam, "error_feedback", True, False)
    assert not any("error" in st_ for st_ in opt.state.values())
    opt, _, _ = switch_then_step(la.Adapprox, "betas", (0.9, 0.999), (0.0, 0.999))
    assert not any("exp_avg" in st_ for st_ in opt.state.values())
    opt, model, _ = switch_then_step(la.GaLoreAdamW, "subspace", "gha", "svd", steps=5, update_proj_gap=5)
    assert not any("P_ref" in st_ for st_ in opt.state.values())  # dropped at the refresh of step 6


def test_gha_switched_on_between_steps_keeps_training():
    opt, model, _ = switch_then_step(la.GaLoreAdamW, "subspace", "svd", "gha", steps=5, update_proj_gap=5)
    train(model, opt, 5, regression_data())  # a refresh at step 11 transforms from P_ref = P
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all("P_ref" in opt.state[p] for p in opt.state if "P" in opt.state[p])


def test_gha_switched_on_continues_from_the_basis_it_has_without_an_svd():
    # GHA computes an SVD only at its first step: switched on from "svd" between
    # refreshes, it tracks the basis it has, and at its next refresh keeps the basis
    # tracked so far, with the moments as they are (P_old = P_new: C = I)
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(6, 10, generator=g, dtype=torch.float64))
    opt = la.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 3}], lr=1e-2, betas=(0.9, 0.99))
    for t in range(1, 5):
        if t == 2:
            opt.param_groups[0]["subspace"] = "gha"
        p.grad = torch.randn(6, 10, generator=g, dtype=torch.float64)
        P_before, m_before = opt.state[p].get("P"), opt.state[p].get("exp_avg")
        opt.step()
    # step 4 was a refresh: the basis is the one GHA had tracked, the moment was not rotated
    assert torch.equal(opt.state[p]["P_ref"], P_before)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.9 * m_before + 0.1 * (P_before.T @ p.grad),
                               atol=1e-14, rtol=0)


STATE_CASES = [(la.GaLoreAdamW, dict(subspace=s)) for s in la.SUBSPACES] + [
    (la.GaLoreAdamW, dict(residual=True)), (la.GaLoreAdamW, dict(refresh="randomized")), (la.AdaptiveAdamW, {}),
    (la.AdaptiveAdamW, dict(refresh="randomized")), (la.LDAdam, {}), (la.LDAdam, dict(proj_method="svd")),
    (la.Adapprox, {}), (la.Adapprox, dict(betas=(0.0, 0.999)))]


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("cls, opts", STATE_CASES, ids=lambda x: x.__name__ if inspect.isclass(x) else str(x))
def test_state_loaded_in_any_layout_continues_bit_exactly(cls, opts, layout):
    # torch.distributed.checkpoint loads saved tensors into templates of the
    # usual (row-major) layout; a basis kept column-major (as QR returns it)
    # would round differently after such a load. Every state tensor is kept
    # contiguous, and made so when loaded, so a load of any layout continues exactly.
    data = regression_data()
    model = mlp()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls, **opts))
    train(model, opt, 7, data)
    for st_ in opt.state.values():
        for name, v in st_.items():
            assert not isinstance(v, torch.Tensor) or v.is_contiguous(), name
    sd = copy.deepcopy(opt.state_dict())
    for st_ in sd["state"].values():
        for name, v in st_.items():
            if isinstance(v, torch.Tensor) and v.dim() == 2:  # the same values, in the given layout
                st_[name] = v.contiguous() if layout == "row-major" else v.T.contiguous().T
    model2 = mlp(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = cls(mlp_groups(model2, cls=cls), **kwargs_for(cls, **opts))
    opt2.load_state_dict(sd)
    assert train(model, opt, 6, data) == train(model2, opt2, 6, data)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


# =============================================================================
# CUDA (skipped without a GPU)
# =============================================================================


FSDP2_ON_DEVICES = """
import io, os, sys, torch, torch.distributed as dist
from datetime import timedelta
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
import lowrank_adam as la
kind = sys.argv[3]  # "cuda": one process per GPU, NCCL; "cpu": gloo (the same script, to try it without a GPU)
if kind == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device())
else:
    torch.set_num_threads(1)
    device = torch.device("cpu")
dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=timedelta(seconds=120))
mesh = init_device_mesh(kind, (dist.get_world_size(),))
FULL = StateDictOptions(full_state_dict=True)
torch.backends.cuda.matmul.allow_tf32 = False

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1)).to(device)

def optimizer(name, m):
    if name == "Adapprox":
        return la.Adapprox(m.parameters(), lr=1e-2, weight_decay=0.1, err_tol=0.05)
    gap = {} if name == "LDAdam" else {"update_proj_gap": 3}
    return getattr(la, name)(la.lowrank_groups(m, 2, targets=("0", "2"), **gap), lr=1e-2, weight_decay=0.1)

def sharded():
    m = model()
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)

g = torch.Generator().manual_seed(1)
x = torch.randn(16, 5, generator=g).to(device)
y = (torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]).to(device)

def train(m, opt, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()

weights = lambda m: [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for p in m.parameters()]
out = {}
for name in ["GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox"]:
    one = model()
    train(one, optimizer(name, one), 6)
    m = sharded()
    opt = optimizer(name, m)
    train(m, opt, 6)
    part = sharded()  # 3 steps, a full state dict through bytes, a fresh run for the other 3
    part_opt = optimizer(name, part)
    train(part, part_opt, 3)
    buf = io.BytesIO()
    torch.save((get_model_state_dict(part, options=FULL), get_optimizer_state_dict(part, part_opt, options=FULL)), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = sharded()
    resumed_opt = optimizer(name, resumed)
    set_model_state_dict(resumed, saved[0], options=FULL)
    set_optimizer_state_dict(resumed, resumed_opt, saved[1], options=FULL)
    train(resumed, resumed_opt, 3)
    out[name] = dict(one=weights(one), fsdp2=weights(m), resumed=weights(resumed))
torch.save(out, os.path.join(sys.argv[2], f"rank{dist.get_rank()}.pt"))
dist.barrier()
dist.destroy_process_group()
"""


def fsdp2_on_devices(tmp_path, kind, nproc):
    """FSDP2_ON_DEVICES under torchrun: each rank's results."""
    script = tmp_path / "on_devices.py"
    script.write_text(FSDP2_ON_DEVICES)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                          str(script), str(ROOT), str(tmp_path), kind], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


@CUDA
def test_fsdp2_with_nccl_one_process_per_gpu_equals_one_process_and_resumes(tmp_path):
    # The GPU path users run: one process per GPU (up to 2), NCCL, FSDP2. Each optimizer equals one
    # process on the same GPU (float32 rounding: the collectives and the GPU's kernels may order sums
    # differently), and a full state dict through bytes resumes as the uninterrupted run.
    for r in fsdp2_on_devices(tmp_path, "cuda", min(2, torch.cuda.device_count())):
        for name, res in r.items():
            for a, b, c in zip(res["one"], res["fsdp2"], res["resumed"]):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
                assert torch.allclose(b, c, rtol=1e-5, atol=1e-6), name


@CUDA
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_cuda_converges_and_matches_cpu_roughly(cls):
    data_cpu = regression_data()
    results = []
    for device in ("cpu", "cuda"):
        model = mlp(device=device)
        opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
        losses = train(model, opt, 60, tuple(t.to(device) for t in data_cpu))
        assert losses[-1] < 0.5 * losses[0]
        results.append(losses[-1])
    assert abs(results[0] - results[1]) < 0.1 * max(results)


@CUDA
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_cuda_round_trip_and_bf16(cls):
    model = mlp(device="cuda", dtype=torch.bfloat16)
    data = regression_data(device="cuda", dtype=torch.bfloat16)
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    train(model, opt, 6, data)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert_same_state(opt.state_dict(), opt2.state_dict())
    for st_ in opt2.state.values():
        for v in st_.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                assert v.device.type == "cuda" and v.dtype == torch.float32


@CUDA
def test_cuda_nan_guard():
    model = mlp(device="cuda")
    x, y = regression_data(device="cuda")
    opt = la.GaLoreAdamW(mlp_groups(model))
    nn.functional.mse_loss(model(x), y).backward()
    model[2].weight.grad[1, 1] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(la.NonFiniteGradientError):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# =============================================================================
# AdaptiveAdamW
# =============================================================================

MONOTONE = ["explained_variance", "singular_value", "conditioning", "combined", "uniform_variance"]


@st.composite
def spectra_and_budget(draw, max_matrices=5, max_len=6):
    L = draw(st.integers(1, max_matrices))
    spectra = []
    for _ in range(L):
        n = draw(st.integers(1, max_len))
        zero = draw(st.booleans()) and draw(st.booleans())
        vals = [0.0] * n if zero else draw(st.lists(st.floats(0.0, 100.0), min_size=n, max_size=n))
        spectra.append(sorted(vals, reverse=True))
    budget = draw(st.integers(L, L * max_len + 3))
    return spectra, budget


@given(sb=spectra_and_budget(), metric=st.sampled_from(sorted(la.RANK_METRICS)))
def test_allocation_invariants(sb, metric):
    spectra, budget = sb
    caps = [len(s) for s in spectra]
    ranks = la.allocate_ranks(spectra, budget, caps, metric)
    assert sum(ranks) == min(budget, sum(caps))
    assert all(1 <= r <= c for r, c in zip(ranks, caps))
    assert ranks == la.allocate_ranks(spectra, budget, caps, metric)  # deterministic


def all_scores(spectra, metric):
    """Score of each possible added rank r+1 (r = 1..cap-1), per matrix."""
    f = la.RANK_METRICS[metric]
    return [[f(s, r, sum(v * v for v in s)) for r in range(1, len(s))] for s in spectra]


@given(sb=spectra_and_budget(), metric=st.sampled_from(MONOTONE))
def test_monotone_metrics_equal_top_scores(sb, metric):
    spectra, budget = sb
    ranks = la.allocate_ranks(spectra, budget, None, metric)
    scores = all_scores(spectra, metric)
    chosen = sorted((v for sc, r in zip(scores, ranks) for v in sc[: r - 1]), reverse=True)
    top = sorted((v for sc in scores for v in sc), reverse=True)[: budget - len(spectra)]
    assert chosen == pytest.approx(top)


@given(sb=spectra_and_budget(max_matrices=3, max_len=4), metric=st.sampled_from(MONOTONE))
def test_greedy_is_optimal_by_brute_force(sb, metric):
    import itertools
    spectra, budget = sb
    caps = [len(s) for s in spectra]
    budget = min(budget, sum(caps))
    scores = all_scores(spectra, metric)
    value = lambda ranks: sum(sum(sc[: r - 1]) for sc, r in zip(scores, ranks))
    best = max(value(rs) for rs in itertools.product(*[range(1, c + 1) for c in caps]) if sum(rs) == budget)
    assert value(la.allocate_ranks(spectra, budget, caps, metric)) == pytest.approx(best)


def test_metric_scores_on_hand_made_spectra():
    s = [4.0, 2.0, 1.0]
    E = 21.0
    M = la.RANK_METRICS
    assert M["explained_variance"](s, 1, E) == pytest.approx(4 / 21)
    assert M["singular_value"](s, 1, E) == pytest.approx(4.0)
    assert M["conditioning"](s, 2, E) == pytest.approx(1 / 4)
    assert M["gap"](s, 2, E) == pytest.approx(1 / 2)
    assert M["combined"](s, 1, E) == pytest.approx(0.5 * 4 / 21 + 0.5 * 2 / 4)
    assert M["uniform_variance"](s, 2, E) == pytest.approx(-20 / 21)
    for f in M.values():  # a zero spectrum scores 0, never NaN
        assert f([0.0, 0.0], 1, 0.0) == 0.0


def test_explained_variance_favours_flat_spectrum():
    # equal energy (Σ s² = 16), one flat and one top-heavy spectrum
    flat = [2.0] * 4
    heavy = [math.sqrt(15.0), math.sqrt(1 / 3), math.sqrt(1 / 3), math.sqrt(1 / 3)]
    r_flat, r_heavy = la.allocate_ranks([flat, heavy], 6, metric="explained_variance")
    assert r_flat > r_heavy


def test_unknown_metric_raises():
    with pytest.raises(ValueError, match="Invalid rank metric"):
        la.allocate_ranks([[1.0]], 1, metric="entropy")
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="Invalid rank_metric"):
        la.AdaptiveAdamW([{"params": [p], "rank": 2}], rank_metric="entropy")


def random_basis(s, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(s, r, generator=g)).Q


def test_transform_identity_when_unchanged():
    P = random_basis(8, 3, 0)
    m, v = torch.randn(3, 5), torch.rand(3, 5)
    m2, v2 = la.transform_moments(P, P, m, v)
    torch.testing.assert_close(m2, m, atol=1e-5, rtol=0)
    torch.testing.assert_close(v2, v, atol=1e-5, rtol=0)


def test_transform_of_v_uses_the_squared_coefficients():
    # P_old = [e1, e2] rotated by 45°: C = [[1, 1], [1, -1]]/√2, so C∘C is 1/2
    # everywhere and each new v is the mean of the old two (|C| would give 1/√2 each)
    P_old = torch.eye(3, dtype=torch.float64)[:, :2]
    P_new = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 0.0]], dtype=torch.float64) / math.sqrt(2)
    m = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 4.0], [9.0, 16.0]], dtype=torch.float64)
    m2, v2 = la.transform_moments(P_new, P_old, m, v)
    torch.testing.assert_close(m2, torch.tensor([[4.0, -2.0], [-2.0, 6.0]], dtype=torch.float64) / math.sqrt(2))
    torch.testing.assert_close(v2, torch.tensor([[5.0, 10.0], [5.0, 10.0]], dtype=torch.float64))


@given(s=st.integers(2, 10), r_old=st.integers(1, 10), r_new=st.integers(1, 10), seed=st.integers(0, 100))
def test_transform_shapes_nonnegativity_and_containment(s, r_old, r_new, seed):
    r_old, r_new = min(r_old, s), min(r_new, s)
    P_old = random_basis(s, r_old, seed)
    g = torch.Generator().manual_seed(seed + 1)
    m, v = torch.randn(r_old, 7, generator=g), torch.rand(r_old, 7, generator=g)
    if r_new >= r_old:  # a new subspace that contains the old one: the momentum is carried exactly
        extra = torch.randn(s, r_new - r_old, generator=g)
        P_new = torch.linalg.qr(torch.cat([P_old, extra], 1)).Q
    else:
        P_new = random_basis(s, r_new, seed + 2)
    m2, v2 = la.transform_moments(P_new, P_old, m, v)
    assert m2.shape == (r_new, 7) and v2.shape == (r_new, 7)
    assert (v2 >= 0).all()
    if r_new >= r_old:
        torch.testing.assert_close(P_new @ m2, P_old @ m, atol=1e-4, rtol=1e-4)


def spectral_grads(shape, flat_first, steps, seed=0):
    """Gradients of two matrices: one with a flat spectrum, one top-heavy."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        a = torch.randn(shape, generator=g)  # flat-ish spectrum
        u, v = torch.randn(shape[0], 1, generator=g), torch.randn(1, shape[1], generator=g)
        b = 10 * u @ v + 0.01 * torch.randn(shape, generator=g)  # nearly rank 1
        out.append((a, b) if flat_first else (b, a))
    return out


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)], ids=["wide", "tall"])
def test_adaptive_reallocates_and_keeps_state_consistent(shape):
    a, b = nn.Parameter(torch.randn(shape)), nn.Parameter(torch.randn(shape))
    opt = la.AdaptiveAdamW([{"params": [a, b], "rank": 3, "update_proj_gap": 2}], lr=1e-2)
    assert opt.ranks() == [3, 3]
    for i, (ga, gb) in enumerate(spectral_grads(shape, True, 3) + spectral_grads(shape, False, 2)):
        a.grad, b.grad = ga, gb
        opt.step()
        ranks = opt.ranks()
        assert sum(ranks) == 6  # budget conserved
        for p, r in zip((a, b), ranks):
            st_ = opt.state[p]
            assert st_["P"].shape == (min(shape), r) and st_["exp_avg"].shape == (r, max(shape))
            assert (st_["exp_avg_sq"] >= 0).all()
        if i < 3:
            assert ranks[0] > ranks[1]  # flat spectrum gets more rank
        elif i == 4:
            assert ranks[0] < ranks[1]  # after the refresh at step 5 the roles swapped


def adaptive_reference(W0s, grads, rank, gap, lr, betas, eps, wd, scale, residual=True, gamma=1.01,
                       transform=True, refresh="svd", seed=0, refresh_iters=1, stagger=False, proj_type="std"):
    """AdaptiveAdamW in float64, step by step, with the default
    ``explained_variance`` metric; every matrix in one group, one budget
    B = Σ the group's rank clamped to each matrix's short side.
    ``transform=False``: no momentum transformation, the moments keep their
    first min(r_old, r_new) rows (zero rows added when the rank grows).
    ``refresh="randomized"``: after step 1, each spectrum is the range
    finder's leading keep + 8 values (keep = min(B - L + 1, max(r, 2·rank)),
    ``refresh_iters`` subspace iterations), scored against the exact energy ‖X‖²_F.
    ``stagger=True``: matrix i refreshes at step 1, then at t ≡ 1 + (i mod gap);
    each allocation is over every matrix's latest spectrum, and a matrix not
    due that is allocated less than it holds drops its last directions at once.

    Returns the final weights and the rank history (one list per step)."""
    Ws = [W.clone() for W in W0s]
    L = len(Ws)
    ranks = [min(rank, min(W.shape)) for W in Ws]  # the group's rank per matrix, clamped
    budget = sum(ranks)  # B
    sides = [PROJECTION_SIDE[proj_type](*W.shape) for W in Ws]
    state = [dict(P=None, M=None, V=None, rms=0.0, U=None, S=None, E=None) for _ in Ws]
    history = []
    for t, Gs in enumerate(grads, start=1):
        Xs = [G if side == "left" else G.T for G, side in zip(Gs, sides)]  # the rows of X are what P spans
        due = [i for i in range(L) if t == 1 or (t - 1 - (i % gap if stagger else 0)) % gap == 0]
        for i in due:  # X = U diag(S) Vᵀ and E = ‖X‖²_F
            st_, X = state[i], Xs[i]
            if refresh == "randomized" and st_["P"] is not None:
                keep = min(budget - L + 1, max(ranks[i], 2 * rank))
                st_["U"], st_["S"] = range_finder(X, st_["P"], keep + 8, seed, t, refresh_iters, index=i)
            else:
                st_["U"], st_["S"] = left_singular_vectors(X), torch.linalg.svdvals(X)
            st_["E"] = (X * X).sum()
        if due:
            # greedy explained variance = rank 1 each, then the budget - L best scores
            # S_k² / E (k >= 2) over every matrix's latest spectrum (they fall with k)
            scores = sorted(((st_["S"][k] ** 2 / st_["E"]).item(), i) for i, st_ in enumerate(state)
                            for k in range(1, len(st_["S"])))[::-1][: budget - L]
            allocated = [1 + sum(1 for _, j in scores if j == i) for i in range(L)]
            for i, (st_, r) in enumerate(zip(state, allocated)):
                if i not in due:  # (stagger) allocated less than it holds: its last directions dropped now
                    if r < ranks[i]:
                        st_["P"], st_["M"], st_["V"], ranks[i] = st_["P"][:, :r], st_["M"][:r], st_["V"][:r], r
                    continue
                P_new = st_["U"][:, :r].clone()
                if st_["P"] is not None:  # each column signed to agree with the previous basis
                    j = min(r, st_["P"].shape[1])
                    P_new[:, :j] *= torch.where((P_new[:, :j] * st_["P"][:, :j]).sum(0) < 0, -1.0, 1.0)
                if st_["P"] is not None and transform:  # momentum transformation, C = P_newᵀ P_old
                    C = P_new.T @ st_["P"]
                    st_["M"], st_["V"] = C @ st_["M"], (C * C) @ st_["V"]
                elif st_["P"] is not None:  # keep the first rows, pad with zero rows
                    k = min(r, st_["M"].shape[0])
                    for key in ("M", "V"):
                        kept = torch.zeros(r, st_[key].shape[1], dtype=st_[key].dtype)
                        kept[:k] = st_[key][:k]
                        st_[key] = kept
                st_["P"], ranks[i] = P_new, r
        history.append(list(ranks))
        for i, (X, st_) in enumerate(zip(Xs, state)):
            P = st_["P"]
            R = P.T @ X
            if st_["M"] is None:
                st_["M"], st_["V"] = torch.zeros_like(R), torch.zeros_like(R)
            st_["M"] = betas[0] * st_["M"] + (1 - betas[0]) * R
            st_["V"] = betas[1] * st_["V"] + (1 - betas[1]) * R * R
            N = (st_["M"] / (1 - betas[0] ** t)) / ((st_["V"] / (1 - betas[1] ** t)).sqrt() + eps)
            if residual:  # the limiter acts on the residual S
                S, st_["rms"] = limit_growth(fira_residual(X, P, R, N), st_["rms"], gamma)
                D = scale * P @ N + S
            else:  # the limiter acts on N
                N, st_["rms"] = limit_growth(N, st_["rms"], gamma)
                D = scale * P @ N
            Ws[i] = Ws[i] * (1 - lr * wd) - lr * (D if sides[i] == "left" else D.T)
    return Ws, history


def test_adaptive_matches_reference_across_rank_changes():
    # One fixed example (the property below ranges over shapes and options):
    # tall, wide and square matrices share one budget; their spectra change
    # over time, so the allocation (and the momentum transformation) changes
    residual, transform = True, True
    shapes_ = list(SHAPES.values())
    g = torch.Generator().manual_seed(0)
    W0s = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes_]
    per_matrix = [gapped_grads(s, 10, seed=i) for i, s in enumerate(shapes_)]
    grads = []
    for t in range(10):  # matrix t % 3 gets a nearly rank-1 gradient, the others a flat one
        grads.append([per_matrix[i][t] * (0.05 if i == t // 3 % 3 else 1.0)
                      + (torch.randn(s, generator=g, dtype=torch.float64) if i != t // 3 % 3 else 0.0)
                      for i, s in enumerate(shapes_)])
    kw = dict(rank=2, gap=3, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, scale=0.5, residual=residual)
    expected, history = adaptive_reference(W0s, grads, **kw, transform=transform)
    assert len({tuple(h) for h in history}) >= 3  # the ranks really change
    params = [nn.Parameter(W.clone()) for W in W0s]
    opt = la.AdaptiveAdamW([{"params": params, "rank": 2, "update_proj_gap": 3, "scale": 0.5}], lr=0.05,
                           betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, residual=residual,
                           transform_momentum=transform)
    for gs, ranks in zip(grads, history):
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()
        assert opt.ranks() == ranks
    for p, w in zip(params, expected):
        torch.testing.assert_close(p.detach(), w, atol=1e-9, rtol=1e-9)


def test_adaptive_randomized_refresh_matches_reference_across_rank_changes():
    # tall, wide, square and a (40, 20) matrix whose sketch is narrower than its
    # short side; the sketched spectra decide the allocation
    residual, iters = True, 2
    shapes_ = list(SHAPES.values()) + [(40, 20)]
    g = torch.Generator().manual_seed(0)
    W0s = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes_]
    per_matrix = [gapped_grads(s, 10, seed=i) for i, s in enumerate(shapes_)]
    grads = [[per_matrix[i][t] * (0.05 if i == t // 3 % 4 else 1.0)
              + (torch.randn(s, generator=g, dtype=torch.float64) if i != t // 3 % 4 else 0.0)
              for i, s in enumerate(shapes_)] for t in range(10)]
    kw = dict(rank=2, gap=3, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, scale=0.5, residual=residual)
    expected, history = adaptive_reference(W0s, grads, **kw, refresh="randomized", seed=4, refresh_iters=iters)
    assert len({tuple(h) for h in history}) >= 3  # the ranks really change
    exact, exact_history = adaptive_reference(W0s, grads, **kw)
    assert not all(torch.allclose(a, b, atol=1e-9, rtol=1e-9) for a, b in zip(exact, expected))
    params = [nn.Parameter(W.clone()) for W in W0s]
    opt = la.AdaptiveAdamW([{"params": params, "rank": 2, "update_proj_gap": 3, "scale": 0.5}], lr=0.05,
                           betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, residual=residual, refresh="randomized",
                           refresh_iters=iters, seed=4)
    for gs, ranks in zip(grads, history):
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()
        assert opt.ranks() == ranks
    for p, w in zip(params, expected):
        torch.testing.assert_close(p.detach(), w, atol=1e-9, rtol=1e-9)


@st.composite
def adaptive_cases(draw):
    """One AdaptiveAdamW group of one to three matrices of any shapes (one budget),
    its rank (the average per matrix) and every option the reference covers."""
    # (1×n and n×1 drawn less often: a rank-1 cap leaves nothing to allocate)
    kinds = SHAPE_KINDS[:3] * 2 + SHAPE_KINDS[3:]
    shapes = [draw(shapes_of_every_kind(kinds=kinds)) for _ in range(draw(between(1, 3)))]
    return dict(shapes=shapes, rank=draw(between(1, max(min(s) for s in shapes) + 1)), steps=draw(st.integers(4, 9)),
                update_proj_gap=draw(st.integers(1, 4)), scale=draw(st.floats(0.1, 1.0)),
                proj_type=draw(st.sampled_from(["std", "reverse_std", "left", "right"])),
                residual=draw(st.booleans()), norm_growth_limit=draw(st.sampled_from([None, 1.01, 1.5])),
                transform_momentum=draw(st.booleans()), refresh=draw(st.sampled_from(["svd", "randomized"])),
                refresh_iters=draw(st.integers(1, 2)), stagger=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=300)
@given(case=adaptive_cases(), adam=ADAM_OPTIONS, data_seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_adaptive_equals_its_reference_at_every_shape_rank_and_option(case, adam, data_seed):
    """AdaptiveAdamW equals ``adaptive_reference``, weights and ranks (``ranks()``)
    after every step, whatever the shapes, budget, gap, Adam setting, residual
    or limiter on N, momentum transformation, refresh and stagger."""
    c = dict(case)
    shapes, rank, steps = c.pop("shapes"), c.pop("rank"), c.pop("steps")
    if c["residual"] and any(residual_vanishes_then_returns(s, s[0] * s[1], c["proj_type"]) for s in shapes):
        c["norm_growth_limit"] = None  # (a matrix may be allocated all of its short side)
    g = torch.Generator().manual_seed(data_seed)
    W0s = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    per_matrix = [separated_grads(s, steps, data_seed + 1 + i) for i, s in enumerate(shapes)]
    grads = [[gs[t] for gs in per_matrix] for t in range(steps)]
    expected, history = adaptive_reference(
        W0s, grads, rank, c["update_proj_gap"], adam["lr"], adam["betas"], adam["eps"], adam["weight_decay"],
        c["scale"], residual=c["residual"], gamma=c["norm_growth_limit"], transform=c["transform_momentum"],
        refresh=c["refresh"], seed=c["seed"], refresh_iters=c["refresh_iters"], stagger=c["stagger"],
        proj_type=c["proj_type"])
    params = [nn.Parameter(W.clone()) for W in W0s]
    opt = la.AdaptiveAdamW([{"params": params, "rank": rank, **c}], **adam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that a rank above a short side is clamped
        for gs, ranks in zip(grads, history):
            for p, G in zip(params, gs):
                p.grad = G.clone()
            opt.step()
            assert opt.ranks() == ranks
    for p, W in zip(params, expected):
        torch.testing.assert_close(p.detach(), W, atol=1e-10, rtol=1e-10)


def test_adaptive_refresh_keep_bounds_memory_without_changing_results():
    # refresh_keep only decides how many singular vectors wait for the
    # allocation: a matrix allocated more gets its SVD again, with the same vectors
    shapes_ = [(8, 20), (20, 8), (12, 12)]
    runs = []
    for keep in (None, 1.0):
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes_]
        opt = la.AdaptiveAdamW([{"params": params, "rank": 3, "update_proj_gap": 2}], lr=1e-2, refresh_keep=keep)
        for t in range(6):
            for i, p in enumerate(params):  # one matrix nearly rank 1, the others flat: ranks move
                p.grad = (torch.randn(p.shape, generator=g) if i != t % 3 else
                          torch.outer(torch.randn(p.shape[0], generator=g), torch.randn(p.shape[1], generator=g)))
            opt.step()
            runs.append(opt.ranks())
        runs.append([p.detach().clone() for p in params])
    assert max(max(r) for r in runs[:6]) > 3  # some matrix got more than refresh_keep × rank vectors
    assert runs[:6] == runs[7:13]
    assert all(torch.equal(a, b) for a, b in zip(runs[6], runs[13]))
    with pytest.raises(ValueError, match="Invalid refresh_keep"):
        la.AdaptiveAdamW([{"params": params, "rank": 3}], refresh_keep=0)


def test_adaptive_refresh_keeps_at_least_the_current_rank(monkeypatch):
    # a matrix already above refresh_keep × the average rank needs no second SVD per refresh
    a, b = nn.Parameter(torch.randn(12, 30)), nn.Parameter(torch.randn(12, 30))
    opt = la.AdaptiveAdamW([{"params": [a, b], "rank": 3, "update_proj_gap": 1}], lr=1e-2, refresh_keep=1.0)
    g = torch.Generator().manual_seed(0)
    flat = lambda: torch.randn(12, 30, generator=g)
    spiky = lambda: torch.outer(torch.randn(12, generator=g), torch.randn(30, generator=g))
    a.grad, b.grad = flat(), spiky()
    opt.step()
    assert opt.ranks()[0] > 3  # above refresh_keep × rank
    calls, spectrum = [], la.gradient_spectrum
    monkeypatch.setattr(la, "gradient_spectrum", lambda *args: calls.append(args) or spectrum(*args))
    a.grad, b.grad = flat(), spiky()
    opt.step()
    assert opt.ranks()[0] > 3 and len(calls) == 2  # one SVD per matrix, none recomputed



@pytest.mark.parametrize("keep", [None, 1.0])
def test_adaptive_refresh_holds_the_vectors_an_allocation_can_use(monkeypatch, keep):
    # Singular vectors held per matrix until the allocation is known: a group with
    # allocate=False, its rank; refresh_keep=None, every vector an allocation could
    # give a matrix (B - L + 1 = 5 here), so no SVD is ever recomputed; otherwise
    # refresh_keep × the group's rank (3), or the matrix's current rank if that
    # is more (then only a matrix allocated more is recomputed)
    fixed, a, b = (nn.Parameter(torch.randn(8, 20)) for _ in range(3))
    opt = la.AdaptiveAdamW([{"params": [fixed], "rank": 2, "allocate": False}, {"params": [a, b], "rank": 3}],
                           lr=1e-2, refresh_keep=keep, update_proj_gap=1)
    held = []  # the columns of U of each SVD, in the order they run: the three matrices', then recomputations
    spectrum = la.gradient_spectrum
    monkeypatch.setattr(la, "gradient_spectrum", lambda *args: held.append((u := spectrum(*args))[0].shape[1]) or u)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        fixed.grad, a.grad = torch.randn(8, 20, generator=g), torch.randn(8, 20, generator=g)
        b.grad = torch.outer(torch.randn(8, generator=g), torch.randn(20, generator=g))  # rank 1: a gets the rest
        opt.step()
        assert opt.ranks() == [2, 5, 1]
    if keep is None:
        assert held == [2, 5, 5] * 2  # nothing recomputed
    else:  # ranks before the refreshes: [2, 3, 3] (a, allocated 5 > 3 held, is recomputed), then [2, 5, 1]
        assert held == [2, 3, 3, 5, 2, 5, 3]

def test_adaptive_budget_counts_clamped_ranks():
    # rank 8 on a 4×100 matrix is really rank 4: the budget is 4 + 8 = 12, as ranks() reports
    a, b = nn.Parameter(torch.randn(4, 100)), nn.Parameter(torch.randn(64, 64))
    opt = la.AdaptiveAdamW([{"params": [a, b], "rank": 8}], lr=1e-2)
    assert opt.ranks() == [4, 8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the clamp warning
        a.grad, b.grad = torch.randn(4, 100), torch.randn(64, 64)
        opt.step()
    assert sum(opt.ranks()) == 12 and opt.ranks()[0] <= 4


def test_adaptive_allocate_false_group_keeps_its_rank_and_others_still_allocate():
    shape = (8, 20)
    fixed = nn.Parameter(torch.randn(shape))
    a, b = nn.Parameter(torch.randn(shape)), nn.Parameter(torch.randn(shape))
    opt = la.AdaptiveAdamW([{"params": [fixed], "rank": 3, "allocate": False},
                            {"params": [a, b], "rank": 3}], lr=1e-2)
    ga, gb = spectral_grads(shape, True, 1)[0]
    fixed.grad, a.grad, b.grad = gb.clone(), ga, gb
    opt.step()
    r_fixed, r_a, r_b = opt.ranks()
    assert r_fixed == 3  # not in the pool, even with a nearly rank-1 gradient
    assert r_a + r_b == 6 and r_a > r_b  # the pool still allocates its own budget


def test_adaptive_groups_that_allocate_must_share_the_metric():
    ps = [nn.Parameter(torch.randn(4, 6)) for _ in range(3)]
    with pytest.raises(ValueError, match="Invalid rank_metric.*same rank_metric"):
        la.AdaptiveAdamW([{"params": ps[:1], "rank": 2, "rank_metric": "gap"}, {"params": ps[1:], "rank": 2}])
    # a group that does not allocate may name any metric
    la.AdaptiveAdamW([{"params": ps[:1], "rank": 2, "rank_metric": "gap", "allocate": False},
                      {"params": ps[1:], "rank": 2}])


@pytest.mark.parametrize("metric, expected", [("explained_variance", [1, 3]), ("singular_value", [2, 2])])
def test_adaptive_allocates_by_the_groups_rank_metric(metric, expected):
    # gradients with known singular values: a = [10, 1, 0.5, 0.1, ...], b = [1, 0.9, ..., 0.3];
    # budget 2 + 2 = 4, so two ranks beyond rank 1 each go to the best next values.
    # explained_variance (s²/E): b's 0.81/3.8 and 0.64/3.8 beat a's 1/101.3 -> [1, 3];
    # singular_value (s²): a's 1, then b's 0.81 (a's next is only 0.25) -> [2, 2]
    g = torch.Generator().manual_seed(0)
    def with_spectrum(values):
        U = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q
        V = torch.linalg.qr(torch.randn(20, 8, generator=g)).Q
        return U @ torch.diag(torch.tensor(values)) @ V.T
    a, b = nn.Parameter(torch.zeros(8, 20)), nn.Parameter(torch.zeros(8, 20))
    opt = la.AdaptiveAdamW([{"params": [a, b], "rank": 2}], lr=1e-2, rank_metric=metric)
    a.grad = with_spectrum([10.0, 1.0, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    b.grad = with_spectrum([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    opt.step()
    assert opt.ranks() == expected


def test_adaptive_limiter_bounds_rms_growth():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 12))
    opt = la.AdaptiveAdamW([{"params": [p], "rank": 3, "update_proj_gap": 4}], lr=1e-2, norm_growth_limit=1.01,
                           residual=False)
    prev = None
    for i in range(12):
        p.grad = torch.randn(6, 12) * (1 + 3 * i)  # growing gradients push the update up
        before = p.detach().clone()
        opt.step()
        step_rms = rms(before - p.detach()).item() / (1e-2 * 0.25)  # = RMS(P N) = RMS(N)·sqrt(r/s)
        if prev is not None:
            assert step_rms <= 1.01 * prev * (1 + 1e-4)
        prev = step_rms


@pytest.mark.parametrize("gamma", [1.01, None])
def test_adaptive_limiter_on_caps_and_off_lets_grow(gamma):
    # g, -g, -g, -g: the momentum nearly cancels at step 2, then the update
    # grows quickly again -- the limiter must cap that growth at γ per step.
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(6, 12, generator=g)
    p = nn.Parameter(torch.zeros(6, 12))
    opt = la.AdaptiveAdamW([{"params": [p], "rank": 3}], lr=1.0, norm_growth_limit=gamma, residual=False)
    sizes = []
    for sign in (1, -1, -1, -1):
        p.grad = sign * grad
        before = p.detach().clone()
        opt.step()
        sizes.append(rms(p.detach() - before).item())
    growth = max(b / a for a, b in zip(sizes[1:], sizes[2:]))
    if gamma is None:
        assert growth > 1.5 and "rms" in opt.state[p] and opt.state[p]["rms"] == 0
    else:
        assert growth <= gamma * (1 + 1e-5)


def test_adaptive_equals_galore_with_fixed_ranks():
    torch.manual_seed(0)
    shapes_ = [(6, 10), (10, 6), (7, 7)]
    params_a = [nn.Parameter(torch.randn(s)) for s in shapes_]
    params_b = [nn.Parameter(p.detach().clone()) for p in params_a]
    hp = dict(lr=1e-2, weight_decay=0.1, update_proj_gap=3)
    opt_a = la.GaLoreAdamW([{"params": params_a, "rank": 3}], **hp)
    opt_b = la.AdaptiveAdamW([{"params": params_b, "rank": 3}], **hp, allocate=False,
                             transform_momentum=False, norm_growth_limit=None, residual=False)
    for _ in range(8):
        for pa, pb in zip(params_a, params_b):
            g = torch.randn(pa.shape)
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)


# =============================================================================
# LDAdam
# =============================================================================


def ld_inputs(s, l, r, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(s, l, generator=g, dtype=torch.float64)
    P_prev = torch.linalg.qr(torch.randn(s, r, generator=g, dtype=torch.float64)).Q
    P = torch.linalg.qr(torch.randn(s, r, generator=g, dtype=torch.float64)).Q
    M = torch.randn(r, l, generator=g, dtype=torch.float64)
    V = torch.rand(r, l, generator=g, dtype=torch.float64)
    return a, P_prev, P, M, V


def ldadam_reference(W0, grads, rank, lr, betas, eps, wd, rho, error_feedback=True, proj_method="power",
                     proj_type="ldadam"):
    """LDAdam in float64, step by step; T is formed explicitly and the error
    buffer written in its projector form."""
    b1, b2 = betas
    W = W0.clone()
    m, n = W.shape
    # the official code: project the rows when m <= n (square too); GaLore's rules as in its reference
    transposed = {"ldadam": m > n, "std": m >= n, "reverse_std": m < n, "left": False, "right": True}[proj_type]
    s = min(W.shape)
    rank = min(rank, s)  # a rank above the short side is clamped to it
    E = torch.zeros(W.T.shape if transposed else W.shape, dtype=W.dtype)
    P = M = V = None
    for t, G in enumerate(grads):  # t = steps taken before this one
        X = G.T if transposed else G
        A = X + E if error_feedback else X  # A ← X + E
        if t == 0:
            P = torch.linalg.svd(A, full_matrices=False).U[:, :rank]  # top-r left singular vectors
            R = P.T @ A
            M, V = torch.zeros_like(R), torch.zeros_like(R)
            E = A - P @ R  # M = 0: only the dropped part of the gradient
        else:
            c1, c2 = 1 - b1 ** t, 1 - b2 ** t
            P_prev = P
            T = rho * P_prev @ M / c1 + (1 - rho) * A  # the target
            if proj_method == "power":
                P = torch.linalg.qr(T @ (T.T @ P_prev)).Q  # one power iteration from P_prev
            else:
                P = torch.linalg.svd(T, full_matrices=False).U[:, :rank]  # top-r left singular vectors of T
            R = P.T @ A
            C = P.T @ P_prev
            M_new = C @ M
            # E ← (I - P Pᵀ)(A + β1/(1-β1) · P_prev M)
            E = (torch.eye(A.shape[0], dtype=W.dtype) - P @ P.T) @ (A + b1 / (1 - b1) * P_prev @ M)
            # V ← c2 · |(C∘C)(V/c2 - M²/c1²) + M̃²/c1²|
            V = c2 * ((C * C) @ (V / c2 - (M / c1) ** 2) + (M_new / c1) ** 2).abs()
            M = M_new
        if not error_feedback:
            E = torch.zeros_like(E)
        M = b1 * M + (1 - b1) * R
        V = b2 * V + (1 - b2) * R * R
        k = t + 1
        N = (M / (1 - b1 ** k)) / ((V / (1 - b2 ** k)).sqrt() + eps)
        D = P @ N
        W = W * (1 - lr * wd) - lr * (D.T if transposed else D)
    return W


@pytest.mark.parametrize("proj_method", ["power", "svd"])
def test_ldadam_matches_reference(proj_method):
    """One fixed example of how LDAdam is compared with its reference, for each way of
    taking P from the target T (the property below ranges over every shape and option)."""
    shape, error_feedback = SHAPES["wide"], True
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(8)]
    kw = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, rho=0.9)
    expected = ldadam_reference(W0, grads, 2, **kw, error_feedback=error_feedback, proj_method=proj_method)
    p = nn.Parameter(W0.clone())
    opt = la.LDAdam([{"params": [p], "rank": 2}], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                    rho=0.9, error_feedback=error_feedback, proj_method=proj_method)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
    # Everything in float64 (the error buffer included: it follows the parameter's
    # precision), so only float64 rounding of other association orders remains
    torch.testing.assert_close(p.detach(), expected, atol=1e-12, rtol=1e-12)
    assert opt.state[p]["error" if error_feedback else "P"].dtype == torch.float64


@settings(max_examples=200)
@given(shape=shapes_of_every_kind(), data=st.data(), adam=ADAM_OPTIONS, rho=st.floats(0.0, 0.95),
       error_feedback=st.booleans(), proj_method=st.sampled_from(["power", "svd"]), steps=st.integers(3, 8),
       data_seed=st.integers(0, 2**16), proj_type=st.sampled_from(["ldadam", *la.PROJ_TYPES]))
def test_ldadam_equals_its_reference_at_every_shape_rank_and_option(shape, data, adam, rho, error_feedback,
                                                                    proj_method, steps, data_seed, proj_type):
    """LDAdam equals ``ldadam_reference`` whatever the shape, rank, Adam
    setting, ρ, error feedback, projection method and orientation."""
    rank = data.draw(ranks_for(min(shape)), label="rank")
    g = torch.Generator().manual_seed(data_seed)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = separated_grads(shape, steps, data_seed)
    expected = ldadam_reference(W0, grads, rank, adam["lr"], adam["betas"], adam["eps"], adam["weight_decay"], rho,
                                error_feedback=error_feedback, proj_method=proj_method, proj_type=proj_type)
    p = nn.Parameter(W0.clone())
    opt = la.LDAdam([{"params": [p], "rank": rank}], **adam, rho=rho, error_feedback=error_feedback,
                    proj_method=proj_method, proj_type=proj_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that a rank above the short side is clamped
        for G in grads:
            p.grad = G.clone()
            opt.step()
            assert opt.ranks() == [min(rank, *shape)]
    torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)


@given(s=st.integers(1, 8), l=st.integers(1, 10), frac=st.floats(0.1, 1.0), seed=st.integers(0, 1000),
       beta1=st.floats(0.0, 0.99))
def test_error_feedback_identity(s, l, frac, seed, beta1):
    r = max(1, round(frac * s))
    a, P_prev, P, M, _ = ld_inputs(s, l, r, seed)
    R, M_new = P.T @ a, P.T @ P_prev @ M
    k = beta1 / (1 - beta1)
    E = la.generalized_error_feedback_(a.clone(), P, R, P_prev, M, M_new, beta1)
    # E = (I - P Pᵀ)(A + k P_prev M)
    expected = (torch.eye(s, dtype=a.dtype) - P @ P.T) @ (a + k * P_prev @ M)
    torch.testing.assert_close(E, expected, atol=1e-9 * (1 + k), rtol=1e-9)
    # nothing is lost: P R + k P M̃ + E = A + k P_prev M
    torch.testing.assert_close(P @ R + k * P @ M_new + E, a + k * P_prev @ M, atol=1e-9 * (1 + k), rtol=1e-9)
    assert torch.allclose(P.T @ E, torch.zeros(r, l, dtype=a.dtype), atol=1e-9 * (1 + k) * (1 + E.abs().max()))


def test_transport_identity_when_basis_unchanged():
    _, _, P, M, V = ld_inputs(6, 9, 3, 0)
    C = P.T @ P
    torch.testing.assert_close(la.transport_second_moment(V, M, C @ M, C, 5, 0.9, 0.99), V, atol=1e-10, rtol=1e-10)


@given(s=st.integers(1, 8), l=st.integers(1, 10), frac=st.floats(0.1, 1.0), seed=st.integers(0, 1000),
       t=st.integers(1, 50))
def test_transport_keeps_zero_variance_zero_and_v_nonnegative(s, l, frac, seed, t):
    # A coordinate whose variance is zero (V̂ = M̂², i.e. V/c2 = M²/c1²) carries
    # none into the new basis: the transported V̂ is exactly M̃̂². This holds only
    # with c1 = 1-β1ᵗ and c2 = 1-β2ᵗ at the step t the moments were taken at.
    r = max(1, round(frac * s))
    _, P_prev, P, M, V = ld_inputs(s, l, r, seed)
    c1, c2 = 1 - 0.9**t, 1 - 0.99**t
    C = P.T @ P_prev
    M_new = la.transform_moments(P, P_prev, M, V)[0]  # M̃ = C M
    V_det = la.transport_second_moment(c2 * (M / c1) ** 2, M, M_new, C, t, 0.9, 0.99)
    torch.testing.assert_close(V_det / c2, (M_new / c1) ** 2, atol=1e-10, rtol=1e-9)
    assert (la.transport_second_moment(V, M, M_new, C, t, 0.9, 0.99) >= 0).all()


def test_transport_takes_the_absolute_value_where_the_moved_variance_comes_out_negative():
    # V̂ < M̂² (as after two recent equal gradients, whose weight in M exceeds theirs in V), the
    # basis turned by 45°: C∘C = ½·1, M = (1, -1)ᵀ gives M̃ = C M = (√2, 0)ᵀ, so the box's
    # (C∘C)(V/c2 - M²/c1²) + M̃²/c1² is (1, -1)/c1² for V = 0, and |·| makes both c2/c1²
    t, beta1, beta2 = 3, 0.9, 0.99
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    h = 0.5**0.5
    C = torch.tensor([[h, -h], [h, h]], dtype=torch.float64)
    M, V = torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
    M_new = C @ M
    torch.testing.assert_close(M_new, torch.tensor([[2**0.5], [0.0]], dtype=torch.float64))
    moved = la.transport_second_moment(V, M, M_new, C, t, beta1, beta2)
    torch.testing.assert_close(moved, torch.full((2, 1), c2 / c1**2, dtype=torch.float64), atol=1e-12, rtol=1e-12)


def test_transport_on_a_permuted_basis_permutes_both_moments():
    _, P_prev, _, M, V = ld_inputs(6, 9, 3, 0)
    perm = [2, 0, 1]
    P = P_prev[:, perm] * torch.tensor([1.0, -1.0, 1.0], dtype=P_prev.dtype)  # reorder, flip one sign
    C = P.T @ P_prev
    M_new = la.transform_moments(P, P_prev, M, V)[0]
    torch.testing.assert_close(P @ M_new, P_prev @ M, atol=1e-12, rtol=0)  # the momentum is carried exactly
    torch.testing.assert_close(la.transport_second_moment(V, M, M_new, C, 4, 0.9, 0.99), V[perm],
                               atol=1e-12, rtol=1e-12)


def test_power_iteration_converges_to_top_subspace():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(12, 12, generator=g)).Q
    W = torch.linalg.qr(torch.randn(30, 12, generator=g)).Q
    S = torch.tensor([10.0, 9.0, 8.0, 3.0] + [1.0] * 8)
    A = U @ torch.diag(S) @ W.T
    top = U[:, :3]
    P = torch.linalg.qr(torch.randn(12, 3, generator=g)).Q
    zero_m = torch.zeros(3, 30)
    angles = []
    for _ in range(8):
        P = la.power_iteration_basis(A, P, zero_m, 0.0, 1.0)
        angles.append(torch.linalg.norm(P - top @ (top.T @ P)).item())  # sin of the subspace angles
    assert all(b <= a + 1e-6 for a, b in zip(angles, angles[1:]))
    assert angles[-1] < 1e-3 < angles[0]


def test_power_iteration_equals_explicit_target():
    a, P_prev, _, M, _ = ld_inputs(7, 11, 3, 1)
    T = 0.4 * P_prev @ M + 0.6 * a
    expected = torch.linalg.qr(T @ (T.T @ P_prev)).Q
    P = la.power_iteration_basis(a, P_prev, M, 0.4, 0.6)
    torch.testing.assert_close(P @ P.T, expected @ expected.T, atol=1e-10, rtol=0)


def quadratic_run(opt_fn, steps=150, seed=0):
    """min ‖W X - Y‖² with a full-rank target: its gradients are not low-rank."""
    g = torch.Generator().manual_seed(seed)
    X, Wt = torch.randn(8, 64, generator=g), torch.randn(8, 8, generator=g)
    Y = Wt @ X
    w = nn.Parameter(torch.zeros(8, 8))
    opt = opt_fn([w])
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = (w @ X - Y).square().mean()
        loss.backward()
        opt.step()
    return (w @ X - Y).square().mean().item()


def test_ldadam_full_rank_without_feedback_behaves_like_adam():
    adam = quadratic_run(lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.908, 0.99)))
    ld = quadratic_run(lambda ps: la.LDAdam([{"params": ps, "rank": 8}], lr=0.05, error_feedback=False))
    start = quadratic_run(lambda ps: torch.optim.SGD(ps, lr=0.0), steps=1)
    assert ld < 0.05 * start and ld < 3 * adam + 1e-3, (start, adam, ld)


def test_ldadam_error_feedback_helps_at_low_rank():
    on = quadratic_run(lambda ps: la.LDAdam([{"params": ps, "rank": 1}], lr=0.05, error_feedback=True))
    off = quadratic_run(lambda ps: la.LDAdam([{"params": ps, "rank": 1}], lr=0.05, error_feedback=False))
    assert on < 0.5 * off, (on, off)


def test_ldadam_svd_option_and_grad_untouched():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 10))
    opt = la.LDAdam([{"params": [p], "rank": 2}], proj_method="svd")
    for _ in range(3):
        p.grad = torch.randn(6, 10)
        g = p.grad.clone()
        opt.step()
        assert torch.equal(p.grad, g)  # the error buffer lives in state, never in p.grad
    assert opt.state[p]["error"].shape == (6, 10) and torch.isfinite(p).all()
    with pytest.raises(ValueError, match="Invalid proj_method"):
        la.LDAdam([{"params": [p], "rank": 2}], proj_method="qr")
    with pytest.raises(ValueError, match="Invalid rho"):
        la.LDAdam([{"params": [p], "rank": 2}], rho=1.5)


def test_ldadam_independent_of_zero_grad_style():
    results = []
    for set_to_none in (True, False):
        torch.manual_seed(0)
        model = mlp()
        opt = la.LDAdam(mlp_groups(model), lr=1e-2)
        x, y = regression_data()
        for _ in range(5):
            opt.zero_grad(set_to_none=set_to_none)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("error_dtype,elt", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("shape", [(20, 8), (8, 20)])
def test_ldadam_state_bytes_formula(error_dtype, elt, shape):
    p = nn.Parameter(torch.randn(shape))
    opt = la.LDAdam([{"params": [p], "rank": 3}], error_dtype=error_dtype)
    for _ in range(2):
        p.grad = torch.randn(shape)
        opt.step()
    (m, n), r = shape, 3
    s, l = min(m, n), max(m, n)
    assert la.state_bytes(opt) == 4 * (2 * r * l + s * r) + elt * m * n
    assert opt.state[p]["error"].dtype == error_dtype


def test_ldadam_bf16_error_buffer_tracks_float32():
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(8, 16))
        opt = la.LDAdam([{"params": [p], "rank": 2}], lr=1e-2, error_dtype=dtype)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            p.grad = torch.randn(8, 16, generator=g)
            opt.step()
        runs.append(opt.state[p]["error"].float())
    assert runs[0].abs().max() > 0.1
    torch.testing.assert_close(runs[1], runs[0], atol=0.05, rtol=0.02)


# =============================================================================
# Adapprox
# =============================================================================


def nonneg_lowrank(m, n, k, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, k, generator=g, dtype=dtype) @ torch.rand(k, n, generator=g, dtype=dtype)


@given(m=st.integers(2, 12), n=st.integers(2, 12), k=st.integers(1, 6), seed=st.integers(0, 1000))
@example(m=2, n=12, k=2, seed=0)
def test_srsi_recovers_low_rank_nonnegative_matrix(m, n, k, seed):
    k = min(k, m, n)
    V = nonneg_lowrank(m, n, k, seed)
    Q, U = la.srsi(V, k, generator=torch.Generator().manual_seed(seed))
    assert Q.shape == (m, k) and U.shape == (n, k)
    torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=V.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(Q @ U.T, V, atol=1e-9 * V.abs().max().item(), rtol=1e-9)


@given(m=st.integers(3, 12), n=st.integers(3, 12), seed=st.integers(0, 1000))
def test_srsi_error_decreases_with_rank_and_iterations_and_cheap_xi_is_exact(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    V = torch.rand(m, n, generator=g, dtype=torch.float64)
    direct = lambda Q, U: (torch.linalg.norm(V - Q @ U.T) / torch.linalg.norm(V)).item()
    by_rank = []
    for k in range(1, min(m, n) + 1):
        Q, U = la.srsi(V, k, generator=torch.Generator().manual_seed(0))
        xi = la.srsi_relative_error(V, U).item()
        assert xi == pytest.approx(direct(Q, U), abs=1e-7)
        by_rank.append(xi)
        optimal = torch.linalg.svdvals(V)[k:].square().sum().sqrt().item() / torch.linalg.norm(V).item()
        assert xi >= optimal - 1e-9  # Eckart-Young: no rank-k approximation beats the SVD
    assert all(b <= a + 1e-6 for a, b in zip(by_rank, by_rank[1:]))
    by_iters = [la.srsi_relative_error(V, la.srsi(V, 1, 0, it, torch.Generator().manual_seed(0))[1]).item()
                for it in range(4)]
    assert all(b <= a + 1e-6 for a, b in zip(by_iters, by_iters[1:]))
    assert by_rank[-1] < 1e-6  # full rank: exact


def test_srsi_relative_error_of_zero_matrix_is_zero():
    V = torch.zeros(4, 5)
    Q, U = la.srsi(V, 2)
    assert la.srsi_relative_error(V, U).item() == 0.0 and torch.isfinite(Q).all()


def adapprox_reference(W0, grads, *, lr, betas, eps, wd, k_init, k_max, err_tol, err_beta, oversample,
                       power_iters, warm_start, nonneg, clip, guidance, seed, index=0, scaling=True, k_min=1,
                       rank_step=1):
    """Adapprox (the paper's method with our labelled choices) in float64, step by step.

    The random sketch is an input like the gradients: Ω at step t is drawn
    from a generator seeded with stream_seed(stream_seed(seed, index), t).
    Returns the final weights, the rank used at each step and the smoothed
    error after each step."""
    b1, b2 = betas
    W = W0.clone()
    m_, n_ = W.shape
    M = torch.zeros_like(W)
    Q = U = Vd = None  # Vd: the dense V, kept instead of Q and U at full rank
    ones_m, ones_n = torch.ones(m_, dtype=W.dtype), torch.ones(n_, dtype=W.dtype)
    row, col = ones_m, ones_n  # V_{t-1} = diag(row) Q Uᵀ diag(col)
    k_min = min(k_min, k_max)
    k, err_ema, ranks, emas, descending = max(k_min, min(k_max, k_init)), 0.0, [], [], True
    for t, G in enumerate(grads, start=1):
        ranks.append(k)
        if t == 1:
            previous = 0.0
        else:
            previous = Vd if Vd is not None else row[:, None] * (Q @ U.T) * col[None, :]
        V = (1 - b2) * G * G + b2 * previous  # the EMA
        if k >= min(m_, n_):  # full rank: V kept dense and used as it is, exact (ξ = 0)
            Vd, Q, U, row, col = V.clamp_min(0), None, None, ones_m, ones_n
            V_hat, xi = Vd, 0.0
        else:
            Vd = None
            if scaling:  # divide out Adafactor's estimate: N = V / (row colᵀ), row summing to 1, col = column sums
                V = V.clamp_min(0)
                total = V.sum().item()
                tiny = torch.finfo(W.dtype).tiny
                row = (V.sum(1) / max(total, tiny)).clamp_min(2.0**-40)  # clamped from below, so N <= 2^40
                col = V.sum(0).clamp_min(max(2.0**-40 * total, tiny))
                V = V / row[:, None] / col[None, :]  # N, factored below in V's place
            width = min(k + oversample, m_, n_)
            warm = Q[:, :min(k, width)] if warm_start and Q is not None else torch.zeros(m_, 0, dtype=W.dtype)
            gen = torch.Generator().manual_seed(la.stream_seed(la.stream_seed(seed, index), t))
            omega = torch.randn(n_, width - warm.shape[1], generator=gen, dtype=W.dtype)
            Qs = torch.linalg.qr(torch.cat([warm, V @ omega], dim=1)).Q
            for _ in range(power_iters):  # subspace iteration on V Vᵀ
                Qs = torch.linalg.qr(V @ torch.linalg.qr(V.T @ Qs).Q).Q
            Ub, S, Wh = torch.linalg.svd(Qs.T @ V, full_matrices=False)
            kk = min(k, width)
            Q, U = Qs @ Ub[:, :kk], Wh[:kk].T * S[:kk]  # V ≈ Q Uᵀ
            norm_v, residual = torch.linalg.norm(V).item(), torch.linalg.norm(V - Q @ U.T).item()
            xi = residual / norm_v if norm_v > 0 else 0.0  # a zero V is exact
            delta = residual / math.sqrt(m_ * n_)  # the RMS error: V̂'s floor
            R = Q @ U.T
            newest = (1 - b2) * G * G / (row[:, None] * col[None, :] if scaling else 1.0)  # in N's units
            V_hat = {"abs": R.abs(), "clamp": R.clamp_min(0), "floor": torch.maximum(R, newest)}[nonneg]
            V_hat = row[:, None] * V_hat.clamp_min(delta) * col[None, :]
        err_ema = xi if descending else err_beta * err_ema + (1 - err_beta) * xi  # reseeded while descending
        emas.append(err_ema)
        if descending and err_ema < err_tol / 2 and k > k_min:
            k = max(k_min, min(k - rank_step, k // 2))  # initial descent: halve
        else:
            descending = False
            k = (min(k + rank_step, k_max) if err_ema > err_tol else
                 max(k - rank_step, k_min) if err_ema < err_tol / 2 else k)
        denom = (V_hat / (1 - b2 ** t)).sqrt() + eps
        if b1 > 0:
            M = b1 * M + (1 - b1) * G
            D = M / (1 - b1 ** t) / denom
        else:
            D = G / denom
        if clip is not None:
            D = D / max(1.0, rms64(D) / clip)
        if guidance:  # cos(M, G), taken as 0 when M or G is zero
            norms = (torch.linalg.norm(M) * torch.linalg.norm(G)).item()
            D = D * (1 + ((M.flatten() @ G.flatten()).item() / norms if norms > 0 else 0.0))
        W = W * (1 - lr * wd) - lr * D
    return W, ranks, emas


def adapprox_reference_for(opts: dict, W0, grads, k_max: int, index: int = 0):
    """``adapprox_reference`` run with the options an ``Adapprox`` was built with
    (``index``: the matrix's position among the optimizer's parameters)."""
    return adapprox_reference(
        W0, grads, lr=opts["lr"], betas=opts["betas"], eps=opts["eps"], wd=opts["weight_decay"],
        k_init=opts["rank_init"] or k_max, k_max=k_max, err_tol=opts["err_tol"], err_beta=opts["err_beta"],
        oversample=opts["oversample"], power_iters=opts["power_iters"], warm_start=opts["warm_start"],
        nonneg=opts["nonneg"], clip=opts["clip_threshold"], guidance=opts.get("cosine_guidance", False),
        seed=opts["seed"], index=index, scaling=opts.get("row_col_scaling", True), k_min=opts.get("k_min", 1),
        rank_step=opts.get("rank_step", 1))


@pytest.mark.parametrize("factor_dtype", ["float64", "float32"])
def test_adapprox_matches_reference_across_rank_changes(factor_dtype):
    """One fixed example of how Adapprox is compared with its reference (the
    property below ranges over every shape, cap and option): a tall matrix
    whose rank shrinks, then grows to full (a dense V); a float64 parameter
    keeps float64 factors even where ``factor_dtype`` asks for float32."""
    shape = (9, 6)
    opts = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, k_max_frac=1.0, rank_init=2, err_tol=0.02,
                err_beta=0.7, oversample=2, power_iters=1, warm_start=True, nonneg="abs", clip_threshold=0.5,
                cosine_guidance=False, seed=7, factor_dtype=factor_dtype)
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    # gradients whose squares are close to low-rank at first, then not: the rank must move
    u, v = torch.rand(shape[0], 1, generator=g, dtype=torch.float64), torch.rand(1, shape[1], generator=g,
                                                                                  dtype=torch.float64)
    grads = [(u @ v).sqrt() * (1 + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)) if t < 4 else
             torch.randn(shape, generator=g, dtype=torch.float64) for t in range(12)]
    expected, ranks, emas = adapprox_reference_for(opts, W0, grads, min(shape))
    assert min(ranks) < 2 < max(ranks) == min(shape)  # it shrinks, then grows to full rank (a dense V)
    assert torch.isfinite(expected).all()
    p = nn.Parameter(W0.clone())
    opt = la.Adapprox([p], **opts)
    for gr, k, ema in zip(grads, ranks, emas):
        assert opt.ranks() == [k]
        p.grad = gr.clone()
        opt.step()
        assert opt.state[p]["err_ema"] == pytest.approx(ema, rel=1e-6, abs=1e-9)  # ξ̄, seeded with ξ at step 1
        # a float64 parameter keeps float64 state, factors included, whatever factor_dtype says
        assert all(v.dtype == torch.float64 for v in opt.state[p].values() if torch.is_tensor(v))
    torch.testing.assert_close(p.detach(), expected, atol=1e-9, rtol=1e-9)


@st.composite
def adapprox_cases(draw):
    """One Adapprox matrix: its shape, how its rank is capped (``k_max_frac``,
    a group ``rank``, or ``rank=None``: a dense V), its position ``index``
    among the optimizer's parameters (it seeds the sketches), and every option."""
    shape = draw(shapes_of_every_kind())
    cap = draw(st.sampled_from(["k_max_frac", "rank", "dense"]))
    steps = draw(st.integers(4, 10))
    return dict(shape=shape, cap=cap, rank=draw(ranks_for(min(shape))) if cap == "rank" else None, steps=steps,
                index=draw(between(0, 3)), low_rank_steps=draw(st.integers(0, steps)), zero_first=draw(st.booleans()),
                flips=draw(st.lists(st.booleans(), min_size=steps, max_size=steps)),
                first_moment=draw(st.booleans()), options=dict(
                    k_max_frac=draw(st.floats(0.1, 1.0)), k_min=draw(between(1, 3)),
                    rank_init=draw(st.one_of(st.none(), between(1, 12))), rank_step=draw(between(1, 3)),
                    err_tol=draw(st.sampled_from([0.0, 0.02, 0.1, 0.5])), err_beta=draw(st.floats(0.0, 0.95)),
                    oversample=draw(st.integers(0, 3)), power_iters=draw(st.integers(0, 2)),
                    warm_start=draw(st.booleans()), nonneg=draw(st.sampled_from(["abs", "clamp", "floor"])),
                    clip_threshold=draw(st.one_of(st.none(), st.floats(0.1, 2.0))),
                    cosine_guidance=draw(st.booleans()), row_col_scaling=draw(st.booleans()),
                    factor_dtype=draw(st.sampled_from(["float64", "float32"])), seed=draw(st.integers(0, 2**16))))


ADAPPROX_DESCENT = dict(  # the initial descent from rank 8 by rank_step 3: 8 -> 4 -> 1 (halving, then the step)
    shape=(8, 8), cap="k_max_frac", rank=None, steps=5, index=0, low_rank_steps=5, zero_first=False, flips=[False] * 5,
    first_moment=True, options=dict(k_max_frac=1.0, k_min=1, rank_init=None, rank_step=3, err_tol=0.5, err_beta=0.5,
                                    oversample=2, power_iters=1, warm_start=True, nonneg="abs", clip_threshold=1.0,
                                    cosine_guidance=False, row_col_scaling=True, factor_dtype="float64", seed=0))


@settings(max_examples=300)
@given(case=adapprox_cases(), adam=ADAM_OPTIONS, data_seed=st.integers(0, 2**16))
@example(case=ADAPPROX_DESCENT, adam=dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0), data_seed=0)
@pytest.mark.slow
def test_adapprox_equals_its_reference_at_every_shape_rank_cap_and_option(case, adam, data_seed):
    """Adapprox equals ``adapprox_reference``, weights after the last step and
    the rank (``ranks()``) before every step, whatever the shape (1×n and n×1:
    not factored, a dense V), the rank cap, the Adam setting with or without a
    first moment, and every option. The gradients' squares are near rank 1 for
    the first ``low_rank_steps`` steps, then not, so the rank moves; the steps
    in ``flips`` turn the gradient's sign (the first moment then points against
    it: a negative cosine for the guidance). A float64 parameter keeps float64
    factors whatever ``factor_dtype`` asks for."""
    shape, steps, opts = case["shape"], case["steps"], dict(case["options"])
    betas = adam["betas"] if case["first_moment"] else (0.0, adam["betas"][1])
    opts["cosine_guidance"] &= betas[0] > 0  # (guidance needs a first moment)
    g = torch.Generator().manual_seed(data_seed)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    u, v = (torch.rand(n, generator=g, dtype=torch.float64) for n in shape)
    near_rank_1 = lambda: torch.outer(u, v).sqrt() * (1 + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64))
    grads = [(-1) ** flip * (near_rank_1() if t < case["low_rank_steps"] else
                             torch.randn(shape, generator=g, dtype=torch.float64))
             for t, flip in enumerate(case["flips"])]
    if case["zero_first"]:  # cos(M, G) of two zeros is 0, not NaN
        grads[0] = torch.zeros(shape, dtype=torch.float64)
    factored = min(shape) >= 2 and case["cap"] != "dense"
    if case["cap"] == "dense" or not factored:  # V dense throughout: the reference held at full rank
        k_max = k_min = min(shape)
    else:  # the documented bounds
        k_max = min(case["rank"], min(shape)) if case["cap"] == "rank" else max(1, int(opts["k_max_frac"] * min(shape)))
        k_min = min(opts["k_min"], k_max)
    reference_opts = {**opts, **adam, "betas": betas, "k_min": k_min}
    expected, ranks, _ = adapprox_reference_for(reference_opts, W0, grads, k_max, index=case["index"])
    p = nn.Parameter(W0.clone())
    group = {"params": [p]} if case["cap"] == "k_max_frac" else {"params": [p], "rank": case["rank"]}
    before = [nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(case["index"])]  # never stepped
    opt = la.Adapprox([{"params": before}] * bool(before) + [group], **adam | {"betas": betas}, **opts)
    for G, k in zip(grads, ranks):
        assert opt.ranks() == ([k] if factored else [])
        p.grad = G.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), expected, atol=1e-9, rtol=1e-9)


def test_adapprox_rank_rule_is_blind_to_the_gradient_scale():
    # ξ is scale-free, so scaled gradients must give the same errors and ranks,
    # over float32's whole range: at 2^-40 V's squares underflow unless V is
    # sketched at scale (ξ read 0 and every rank fell to k_min); at 2^62 G²
    # overflows unless G is scaled before it is squared; at 2^-72 V itself lies
    # below float32's range, so U is kept at scale with its exponent; at 2^±100
    # the scale exponent must not be clamped early (its clamp is at ±126).
    runs = []
    for scale in (1.0, 2.0 ** -40, 2.0 ** 40, 2.0 ** -72, 2.0 ** 62, 2.0 ** -100, 2.0 ** 100):
        g = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn(16, 24, generator=g))
        opt = la.Adapprox([p], lr=1e-3, err_tol=0.2)
        trace = []
        for _ in range(6):
            p.grad = torch.randn(16, 24, generator=g) * scale
            opt.step()
            trace.append((opt.ranks()[0], opt.state[p]["err_ema"]))
        runs.append(trace)
    assert runs[0][0][1] > 0.1 and all(run == runs[0] for run in runs)
    p = nn.Parameter(torch.randn(16, 24))
    opt = la.Adapprox([p], lr=1e-3)
    for scale in (2.0 ** -140, 2.0 ** 60, 0.0):  # subnormal (beyond the clamp), huge, zero: still finite
        p.grad = torch.randn(16, 24) * scale
        opt.step()
        assert torch.isfinite(p).all() and math.isfinite(opt.state[p]["err_ema"])


def test_adapprox_history_survives_a_gradient_jump_of_40_octaves():
    # Step 1: G = 1 at (0, 0) only. Step 2: G = 2^40 at (1, 1) only. V is
    # diagonal, so a rank-2 factorization is exact, and V at (0, 0) is only the
    # decayed history β2(1-β2), which lies 4^40 below the new G² term: U must be
    # rescaled by 4^(e-h) = 4^-40 exactly (the exponent clamp is at ±63).
    b1, b2, lr, eps = 0.9, 0.99, 0.1, 1e-8
    p = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = la.Adapprox([p], lr=lr, betas=(b1, b2), eps=eps, k_max_frac=1.0, err_tol=0.0,
                      clip_threshold=None)
    g1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    g2 = torch.tensor([[0.0, 0.0], [0.0, 2.0 ** 40]], dtype=torch.float64)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    d1 = 1.0 / (1.0 + eps)  # step 1 at (0, 0): M̂ = 1, V̂ = 1
    m_hat = b1 * (1 - b1) / (1 - b1**2)  # step 2 at (0, 0): G = 0
    v_hat = b2 * (1 - b2) / (1 - b2**2)
    d2 = m_hat / (v_hat**0.5 + eps)
    torch.testing.assert_close(p.detach()[0, 0], torch.tensor(-lr * (d1 + d2), dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_adapprox_state_without_the_scale_exponent_loads_and_continues_exactly():
    # an older state dict holds U itself (V ≈ Q Uᵀ) and no u_exp; read as
    # exponent 0, it continues exactly as the run that wrote it (powers of two)
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(10, 14, generator=g))
    opt = la.Adapprox([p], lr=1e-2)
    grads = [torch.randn(10, 14, generator=g) * 1e-3 for _ in range(6)]
    for gr in grads[:3]:
        p.grad = gr.clone()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    st_ = sd["state"][0]
    assert st_["u_exp"].item() < 0  # small gradients: U is kept scaled up
    st_["U"] = st_["U"] * 4.0 ** st_.pop("u_exp")
    q = nn.Parameter(p.detach().clone())
    opt2 = la.Adapprox([q], lr=1e-2)
    opt2.load_state_dict(sd)
    for gr in grads[3:]:
        p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        opt2.step()
    assert torch.equal(p, q) and opt.state[p]["err_ema"] == opt2.state[q]["err_ema"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6)])
def test_adapprox_full_rank_equals_adamw(beta1, shape, dtype):
    # At full rank V is kept dense, so Adapprox is AdamW also in float32, in
    # every entry: gradients spanning six orders of magnitude put entries of V
    # twelve orders below its largest, far below the ~1e-7·‖V‖ rounding that a
    # float32 factorization carries into each of them.
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=dtype)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    hp = dict(lr=1e-2, betas=(beta1, 0.99), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([a], foreach=False, **hp)
    opt = la.Adapprox([b], **hp, k_max_frac=1.0, err_tol=0.0, clip_threshold=None)
    magnitudes = 10.0 ** -torch.randint(0, 7, shape).to(dtype)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-6)
    for _ in range(10):
        g = torch.randn(shape, dtype=dtype) * magnitudes
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
        torch.testing.assert_close(b, a, **tol)
    assert opt.ranks() == [min(shape)]
    assert ("exp_avg" in opt.state[b]) == (beta1 > 0)


@pytest.mark.parametrize("tol,direction", [(1e-6, "grow"), (10.0, "shrink")])
def test_adapprox_rank_adapts_within_bounds(tol, direction):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(16, 24))
    init = 1 if direction == "grow" else 6
    opt = la.Adapprox([p], k_max_frac=0.5, rank_init=init, err_tol=tol, rank_step=2)
    history = [opt.ranks()[0]]
    for _ in range(6):
        p.grad = torch.randn(16, 24)
        opt.step()
        history.append(opt.ranks()[0])
    assert all(1 <= k <= 8 for k in history)
    # growth by rank_step; the initial descent halves (at least rank_step) until ξ̄ reaches err_tol/2
    assert all(b - a <= 2 and b >= min(a - 2, a // 2) for a, b in zip(history, history[1:]))
    if direction == "grow":
        assert history[-1] == 8 and history == sorted(history)
    else:
        assert history[-1] == 1 and history == sorted(history, reverse=True)



@given(shape=st.tuples(st.integers(2, 12), st.integers(2, 12)), frac=st.floats(0.05, 1.0),
       k_min=st.integers(1, 6), rank_init=st.one_of(st.none(), st.integers(1, 14)),
       err_tol=st.sampled_from([0.0, 1e9]))
def test_adapprox_ranks_follow_the_documented_bounds(shape, frac, k_min, rank_init, err_tol):
    # k_max = max(1, ⌊k_max_frac · min(m, n)⌋); k_min is capped at k_max; the
    # rank starts at k_max or at rank_init clamped into [k_min, k_max]
    k_max = max(1, math.floor(frac * min(shape)))
    lo = min(k_min, k_max)
    start = k_max if rank_init is None else max(lo, min(k_max, rank_init))
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(shape, generator=g))
    opt = la.Adapprox([p], k_max_frac=frac, k_min=k_min, rank_init=rank_init, err_tol=err_tol)
    assert opt.ranks() == [start]
    for _ in range(3):
        p.grad = torch.randn(shape, generator=g)
        used = opt.ranks()[0]
        opt.step()
        assert lo <= opt.ranks()[0] <= k_max
        st = opt.state[p]
        if used == min(shape):  # full rank: a dense V in place of Q and U
            assert st["V"].shape == shape and "Q" not in st and "U" not in st
        else:
            assert st["Q"].shape == (shape[0], used) and "V" not in st
    # a huge tolerance keeps the initial descent going, halving the rank (by at least one) each
    # step; a zero one settles at once and grows it by one a step (ξ > 0 below full rank)
    expected = start
    for _ in range(3):
        expected = max(lo, min(expected - 1, expected // 2)) if err_tol > 1 else min(k_max, expected + 1)
    assert opt.ranks()[0] == expected


def test_adapprox_group_rank_above_the_short_side_is_capped_at_it():
    # k_max = min(rank, min(m, n)): a group rank of 8 on a 5×12 matrix allows
    # at most rank 5 (exact: V is then kept dense, 60 numbers in place of Q and
    # U's 85), and 3 on it caps at 3, whatever k_max_frac says
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(5, 12, generator=g))
    assert la.Adapprox.rank_bounds(p, {"rank": 8, "k_min": 1, "k_max_frac": 0.25})[:2] == (1, 5)
    assert la.Adapprox.rank_bounds(p, {"rank": 3, "k_min": 4, "k_max_frac": 1.0})[:2] == (3, 3)
    opt = la.Adapprox([{"params": [p], "rank": 8}], lr=1e-2, err_tol=0.0)
    assert opt.ranks() == [5]
    for _ in range(3):
        p.grad = torch.randn(5, 12, generator=g)
        opt.step()
        assert opt.ranks() == [5] and opt.state[p]["V"].shape == (5, 12) and "Q" not in opt.state[p]


@pytest.mark.parametrize("shape,factored", [((2, 9), True), ((9, 2), True), ((2, 2), True), ((1, 9), False),
                                            ((9, 1), False)])
def test_adapprox_factors_every_matrix_with_at_least_two_rows_and_columns(shape, factored):
    p = nn.Parameter(torch.randn(shape))
    opt = la.Adapprox([p], lr=1e-2)
    p.grad = torch.randn(shape)
    opt.step()
    assert la.Adapprox.is_factored(p) == factored
    assert ("Q" in opt.state[p] and "U" in opt.state[p]) == factored
    assert ("exp_avg_sq" in opt.state[p]) == (not factored)
    assert opt.ranks() == ([1] if factored else [])  # k_max = max(1, ⌊0.25 · 2⌋) = 1


@pytest.mark.parametrize("power_iters", [1, 3])
def test_srsi_is_scale_equivariant_across_the_float32_range(power_iters):
    # Adam's second moment of tiny gradients (|g| ~ 1e-10) has entries ~ 1e-23:
    # S-RSI must orthonormalize after every product, or V Vᵀ Q (~ 1e-46)
    # underflows in float32 and the sketch is lost
    V = torch.rand(12, 16, generator=torch.Generator().manual_seed(0))
    Q, U = la.srsi(V, 3, 2, power_iters, torch.Generator().manual_seed(1))
    for c in (2.0**-75, 2.0**-40, 2.0**40):
        Qc, Uc = la.srsi(c * V, 3, 2, power_iters, torch.Generator().manual_seed(1))
        torch.testing.assert_close(Qc @ Uc.T / c, Q @ U.T, atol=1e-5, rtol=1e-4)


def adapprox_delta(clip, guidance=False, lr=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(8, 12, generator=g))
    before = p.detach().clone()
    opt = la.Adapprox([p], lr=lr, clip_threshold=clip, cosine_guidance=guidance)
    p.grad = torch.randn(8, 12, generator=g)
    p.grad[0] *= 1e-4  # tiny second moment in a row -> large normalized update there
    opt.step()
    return before - p.detach()


def test_adapprox_clipping_bounds_rms_and_never_enlarges():
    free = adapprox_delta(None)
    for d in (0.05, 0.5, 1.0):
        clipped = adapprox_delta(d)
        assert rms(clipped).item() <= d * (1 + 1e-5)
        assert (clipped.abs() <= free.abs() * (1 + 1e-6)).all()
    huge = adapprox_delta(1e12)  # a threshold above RMS(D) changes nothing
    torch.testing.assert_close(huge, free)


def test_adapprox_cosine_guidance_doubles_the_first_step():
    # step 1: M = (1-β1) G, so cos(M, G) = 1 and the update is scaled by 2
    torch.testing.assert_close(adapprox_delta(None, guidance=True), 2 * adapprox_delta(None), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Invalid cosine_guidance"):
        la.Adapprox([nn.Parameter(torch.randn(3, 3))], betas=(0.0, 0.999), cosine_guidance=True)


@pytest.mark.parametrize("factor_dtype", ["float32", "float64"])
@pytest.mark.parametrize("scaling", [True, False])
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adapprox_state_bytes_formula(beta1, scaling, factor_dtype):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s)) for s in [(16, 40), (40, 12), (7,), (1, 9), (3, 5)]]
    groups = [{"params": ps[:4]}, {"params": ps[4:], "rank": 3, "rank_init": None, "err_tol": 0.0}]  # full: V dense
    opt = la.Adapprox(groups, betas=(beta1, 0.999), rank_init=2, row_col_scaling=scaling, factor_dtype=factor_dtype)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape)
        opt.step()
    k = opt.ranks()
    assert k[2] == 3 and opt.state[ps[4]]["V"].shape == (3, 5) and "Q" not in opt.state[ps[4]]
    factored = [(16, 40), (40, 12)]
    f = 8 if factor_dtype == "float64" else 4  # bytes of a number of V's factors (M stays float32)
    # Q, U, U's 0-d scale exponent and (with row/column scaling) the m + n scales per factored matrix
    expected = sum(f * (ki * (m + n) + 1 + (m + n if scaling else 0)) + 4 * (m * n if beta1 > 0 else 0)
                   for ki, (m, n) in zip(k, factored))
    expected += f * (3 * 5 + 1) + 4 * (3 * 5 if beta1 > 0 else 0)  # the dense V and its exponent
    dense = 7 + 9  # the 1-D and 1×n tensors keep exact moments
    expected += 4 * dense * (2 if beta1 > 0 else 1)
    assert la.state_bytes(opt) == expected
    assert len(k) == 3


def test_adapprox_rank_growing_to_full_clamps_the_undershoot_of_the_factors():
    # Rank 4 of 5, then full rank (a dense V): the EMA then starts from the raw Q Uᵀ, which undershoots
    # below 0 in places; with a zero gradient V is only that, and a negative V would give sqrt(V) = NaN.
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(6, 5, generator=g))
    opt = la.Adapprox([p], lr=1e-2, k_max_frac=1.0, rank_init=4, err_tol=0.0)
    p.grad = torch.randn(6, 5, generator=g) ** 3
    opt.step()
    st = opt.state[p]
    assert opt.ranks() == [5] and (st["Q"] @ st["U"].T).min() < 0  # the undershoot this test is about
    p.grad = torch.zeros(6, 5)
    opt.step()
    assert "Q" not in st and (st["V"] >= 0).all() and torch.isfinite(p).all()


def test_adapprox_state_from_float32_factors_continues_in_float64():
    # A state dict written with float32 factors (or by a version without the option) loads into a default
    # optimizer and continues: Q, U, row, col are converted to float64 once, exactly as when a running
    # optimizer's group is switched to factor_dtype="float64".
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(10, 14, generator=g) for _ in range(6)]
    p = nn.Parameter(torch.randn(10, 14, generator=g))
    opt = la.Adapprox([p], lr=1e-2, factor_dtype="float32", rank_init=3)
    for gr in grads[:3]:
        p.grad = gr.clone()
        opt.step()
    assert opt.state[p]["Q"].dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["factor_dtype"]  # as a version without the option wrote it
    q = nn.Parameter(p.detach().clone())
    resumed = la.Adapprox([q], lr=1e-2)
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["factor_dtype"] == "float64"
    opt.param_groups[0]["factor_dtype"] = "float64"
    for gr in grads[3:]:
        p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        resumed.step()
    assert torch.equal(p, q) and resumed.state[q]["U"].dtype == torch.float64


def test_adapprox_float64_factors_resolve_what_float32_rounds_away():
    # A constant G whose square is of rank 2 (to G's rounding), with entries over 13 orders of magnitude,
    # at rank 2 held: the factorization holds V exactly in principle, so every coordinate moves as AdamW's.
    # Float32 rounds V's smallest entries away (about 1e-7 of its largest in each); float64 keeps them.
    g = torch.Generator().manual_seed(0)
    a = 10.0 ** (-10 * torch.rand(2, 12, 1, generator=g, dtype=torch.float64))
    b = 10.0 ** (-10 * torch.rand(2, 1, 10, generator=g, dtype=torch.float64))
    G = (a[0] @ b[0] + a[1] @ b[1]).sqrt().float()
    w0 = torch.randn(12, 10, generator=g)
    moved, opts = {}, {}
    for name in ("adamw", "float32", "float64"):
        p = nn.Parameter(w0.clone())
        opts[name] = opt = (torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0) if name == "adamw" else
                            la.Adapprox([p], lr=1e-2, k_max_frac=0.2, err_tol=0.0, clip_threshold=None,
                                        factor_dtype=name))
        for _ in range(5):
            p.grad = G.clone()
            opt.step()
        moved[name] = p.detach() - w0
    deviation = {k: ((moved[k] - moved["adamw"]).abs() / moved["adamw"].abs()).max().item()
                 for k in ("float32", "float64")}
    assert deviation["float64"] < 1e-2 and deviation["float32"] > 0.1, deviation
    state = next(iter(opts["float64"].state.values()))
    assert opts["float64"].ranks() == [2] and state["Q"].shape == (12, 2)
    assert all(state[k].dtype == torch.float64 for k in ("Q", "U", "row", "col"))
    assert state["exp_avg"].dtype == torch.float32


# -- Adapprox: the dense V at full rank, factor_dtype, the scale exponent --

ADAPPROX_BOOKKEEPING = {"step", "rank", "err_ema", "seed", "descending", "u_exp"}


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op that runs inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_adapprox_full_rank_state_holds_only_the_dense_v_and_a_later_fall_starts_cold():
    """A 6×5 matrix at rank 4, then 5 (full: V kept dense), then 4 again.

    At full rank the state holds V and its exponent in place of Q, U, row and
    col (none of them is left over from the factored steps), and the state's
    bytes are those of V alone; when the rank falls below full again the
    factorization starts from a fresh sketch (there is no Q to warm-start
    from), so the weights equal the float64 reference's at every step."""
    shape = (6, 5)
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(6)]
    opts = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, k_max_frac=1.0, rank_init=4,
                err_tol=0.05, err_beta=0.5, oversample=2, power_iters=1, warm_start=True, nonneg="abs",
                clip_threshold=None, seed=7)
    _, ranks, _ = adapprox_reference_for(opts, W0, grads, 5)
    assert ranks == [4, 5, 5, 4, 4, 4]
    p = nn.Parameter(W0.clone())
    opt = la.Adapprox([p], **opts)
    for t, (gr, k) in enumerate(zip(grads, ranks), start=1):
        assert opt.ranks() == [k]
        p.grad = gr.clone()
        opt.step()
        st = opt.state[p]
        if k == 5:
            assert set(st) == ADAPPROX_BOOKKEEPING | {"exp_avg", "V"}
            assert la.state_bytes(opt) == 8 * (6 * 5 + 1) + 8 * 6 * 5  # V, u_exp (float64), exp_avg (float64 p)
        else:
            assert set(st) == ADAPPROX_BOOKKEEPING | {"exp_avg", "Q", "U", "row", "col"}
        expected = adapprox_reference_for(opts, W0, grads[:t], 5)[0]
        torch.testing.assert_close(p.detach(), expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("shape", [(6, 6), (5, 8), (8, 5)], ids=["square", "wide", "tall"])
def test_adapprox_a_full_rank_step_draws_no_random_numbers(shape):
    """At full rank nothing is sketched: a step draws no Gaussian numbers (a
    factored step of the same matrix does)."""
    g = torch.Generator().manual_seed(0)
    full = nn.Parameter(torch.randn(shape, generator=g))
    factored = nn.Parameter(torch.randn(shape, generator=g))
    opt_full = la.Adapprox([full], lr=1e-2, k_max_frac=1.0, err_tol=0.0)
    opt_factored = la.Adapprox([factored], lr=1e-2, rank_init=2, err_tol=1e9)
    for _ in range(3):
        grad = torch.randn(shape, generator=g)
        full.grad, factored.grad = grad.clone(), grad.clone()
        with RecordOps() as rec_full:
            opt_full.step()
        with RecordOps() as rec_factored:
            opt_factored.step()
        assert opt_full.ranks() == [min(shape)] and "V" in opt_full.state[full]
        assert not [op for op in rec_full.ops if "randn" in op or "normal" in op], rec_full.ops
        assert any("randn" in op for op in rec_factored.ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factor_dtype", ["float64", "float32"])
def test_adapprox_the_update_is_computed_in_float32_from_the_float64_denominator(dtype, factor_dtype):
    """V is formed in the factor dtype, but the update is float32 arithmetic:
    with β1 = 0, no clipping and lr = 1 each step at full rank is exactly
    W ← round(W + -(G / float32(sqrt(V̂/(1-β2ᵗ)) + ε))) with the quotient
    and the sum taken in float32 and rounded once to the parameter's dtype, where
    sqrt(V̂/(1-β2ᵗ)) + ε is formed in the factor dtype from the dense V the
    state holds (at scale 4^-u_exp)."""
    b2, eps = 0.99, 1e-8
    g = torch.Generator().manual_seed(0)
    shape = (7, 9)
    p = nn.Parameter(torch.randn(shape, generator=g).to(dtype))
    opt = la.Adapprox([p], lr=1.0, betas=(0.0, b2), eps=eps, k_max_frac=1.0, err_tol=0.0, clip_threshold=None,
                      factor_dtype=factor_dtype)
    fd = torch.float64 if factor_dtype == "float64" else torch.float32
    for t in (1, 2, 3):
        grad = (torch.randn(shape, generator=g) * 10.0 ** -torch.randint(0, 4, shape, generator=g)).to(dtype)
        before = p.detach().clone()
        p.grad = grad.clone()
        opt.step()
        st = opt.state[p]
        assert st["V"].dtype == fd and st["u_exp"].dtype == fd
        denom = st["V"].sqrt().mul(torch.exp2(st["u_exp"])).div((1 - b2**t) ** 0.5).add(eps)
        update = -(grad.float() / denom.float())
        assert torch.equal(p.detach(), (before.float() + update).to(dtype)), t
        # the check can tell float32 arithmetic apart: a quotient taken in float64 (float32 parameter) or
        # by a denominator rounded to bf16 (bf16 parameter) rounds differently somewhere
        other = -(grad.double() / denom) if dtype == torch.float32 else -(grad.float() / denom.to(dtype).float())
        if t > 1 and (dtype, fd) != (torch.float32, torch.float32):
            assert not torch.equal((before.float() + update).to(dtype), (before.double() + other).to(dtype)), t


def _convert_by_hand(state: dict, dtype: torch.dtype) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and key != "exp_avg":
            state[key] = value.to(dtype)


@pytest.mark.parametrize("start,switch", [("float32", "float64"), ("float64", "float32")],
                         ids=["32to64", "64to32"])
@pytest.mark.parametrize("case", ["factored", "factored-unscaled", "full"])
def test_adapprox_switching_factor_dtype_mid_run_converts_every_factor(start, switch, case):
    """factor_dtype switched in a running optimizer's param group: from the
    next step on every state tensor but M is in the new dtype (M stays
    float32), and the run continues exactly as one whose state was converted
    by hand at the switch."""
    shape = (10, 14)
    options = {"factored": dict(rank_init=3, err_tol=0.5),
               "factored-unscaled": dict(rank_init=3, err_tol=0.5, row_col_scaling=False),
               "full": dict(k_max_frac=1.0, err_tol=0.0)}[case]
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * 10.0 ** -torch.randint(0, 3, shape, generator=g) for _ in range(6)]
    p, q = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    a = la.Adapprox([p], lr=1e-2, factor_dtype=start, **options)
    b = la.Adapprox([q], lr=1e-2, factor_dtype=start, **options)
    new = torch.float64 if switch == "float64" else torch.float32
    for t, gr in enumerate(grads):
        if t == 3:
            a.param_groups[0]["factor_dtype"] = b.param_groups[0]["factor_dtype"] = switch
            _convert_by_hand(b.state[q], new)
        p.grad, q.grad = gr.clone(), gr.clone()
        a.step()
        b.step()
        sa, sb = a.state[p], b.state[q]
        assert set(sa) == set(sb) and ("V" in sa) == (case == "full")
        expected = new if t >= 3 else (torch.float64 if start == "float64" else torch.float32)
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == (torch.float32 if key == "exp_avg" else expected), (t, key)
                assert torch.equal(value, sb[key]), (t, key)
        assert torch.equal(p, q), t


def test_adapprox_the_scale_exponent_follows_the_dense_v_when_the_gradient_falls_80_octaves():
    """At full rank Adapprox is AdamW; that holds when the gradient falls by
    2^-80 after the first steps: the history in V must still be carried at
    its own scale (a scale taken from the new gradient alone would put V's
    history 4^80 away, beyond the exponent's clamp)."""
    torch.manual_seed(0)
    shape = (5, 7)
    w0 = torch.randn(shape, dtype=torch.float64)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-30, weight_decay=0.0)
    ref = torch.optim.AdamW([a], foreach=False, **hp)
    opt = la.Adapprox([b], **hp, k_max_frac=1.0, err_tol=0.0, clip_threshold=None)
    for scale in (1.0, 1.0, 2.0 ** -80, 2.0 ** -80, 2.0 ** -80):
        grad = torch.randn(shape, dtype=torch.float64) * scale
        a.grad, b.grad = grad.clone(), grad.clone()
        ref.step()
        opt.step()
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
    assert opt.ranks() == [5] and "V" in opt.state[b]


@pytest.mark.parametrize("factor_dtype,expected", [("float64", [torch.float64, torch.float32]),
                                                   ("float32", [torch.float32])])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
def test_adapprox_a_full_rank_step_updates_the_dense_v_in_place(shape, factor_dtype, expected):
    """At full rank a step allocates one m×n temporary for V (in the factor
    dtype) and, with float64 factors, the float32 update: the dense V of the
    state is overwritten in place, not replaced by a fresh copy."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(shape, generator=g))
    opt = la.Adapprox([p], lr=1e-2, k_max_frac=1.0, err_tol=0.0, factor_dtype=factor_dtype)
    for step in range(3):
        p.grad = torch.randn(shape, generator=g)
        V = opt.state[p].get("V")
        with FullSizeAllocations(p.numel()) as counter:
            opt.step()
        assert opt.ranks() == [min(shape)]
        if step > 0:
            assert counter.dtypes == expected, counter.ops
            assert opt.state[p]["V"] is V  # the same tensor, overwritten


def test_adapprox_switching_to_full_rank_clamps_the_undershoot_to_zero():
    """Rank 4 of 5, then full rank with a zero gradient: the dense V is then
    β2 times the previous factored V, diag(row) Q Uᵀ diag(col), with its
    negative entries (the factorization's undershoot) set to 0, not to their
    magnitude."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(6, 5, generator=g, dtype=torch.float64))
    b2 = 0.99
    opt = la.Adapprox([p], lr=1e-2, betas=(0.9, b2), k_max_frac=1.0, rank_init=4, err_tol=0.0)
    p.grad = torch.randn(6, 5, generator=g, dtype=torch.float64) ** 3
    opt.step()
    st = opt.state[p]
    assert opt.ranks() == [5] and "Q" in st
    previous = st["row"][:, None] * (st["Q"] @ st["U"].T) * st["col"][None, :] * 4.0 ** st["u_exp"]
    negative = previous < 0
    assert negative.any() and (~negative).any()
    p.grad = torch.zeros(6, 5, dtype=torch.float64)
    opt.step()
    V = st["V"] * 4.0 ** st["u_exp"]
    assert "Q" not in st
    assert (V[negative] == 0).all()
    torch.testing.assert_close(V[~negative], b2 * previous[~negative], rtol=1e-12, atol=0)


def test_adapprox_row_col_scales_floor_rows_and_columns_at_two_to_the_minus_40():
    """row_col_scales clamps rows at 2^-40 (as shares) and columns at 2^-40
    of V's total, exactly; rows and columns above the floors keep their
    shares and sums; every V_ij / (row_i col_j) is at most 2^40."""
    v = torch.ones(4, 5, dtype=torch.float64)
    v[:, 0] *= 2.0 ** -60  # a column far below the floor
    v[:, 1] *= 2.0 ** -36  # one just above it (its sum is 4·2^-36 of a total of about 16 = 2^-38 of it)
    v[0] *= 2.0 ** -70  # a row far below its floor
    total = v.sum()
    row, col = la.row_col_scales(v)
    assert col[0].item() == 2.0 ** -40 * total.item()
    assert col[1].item() == v[:, 1].sum().item() and col[1] > 2.0 ** -40 * total
    assert torch.equal(col[2:], v[:, 2:].sum(0))
    assert row[0].item() == 2.0 ** -40
    assert torch.equal(row[1:], v[1:].sum(1) / total)
    assert (v / (row[:, None] * col[None, :])).max() <= 2.0 ** 40
    # the column floor binds exactly at 2^-40 of the total: just below it, a column is raised to it
    w = torch.ones(2, 2, dtype=torch.float64)
    w[:, 0] = 2.0 ** -41  # column sum 2^-40, total 2 + 2^-40
    _, c = la.row_col_scales(w)
    assert c[0].item() == 2.0 ** -40 * w.sum().item() > w[:, 0].sum().item()


@pytest.mark.parametrize("n", [2, 3], ids=["dense", "factored"])
def test_adapprox_history_survives_a_gradient_jump_of_63_octaves(n):
    """Step 1: G = 1 at (0, 0) only. Step 2: G = 2^63 at (1, 1) only. V is
    diagonal, so it is held exactly both dense (2×2, full rank) and factored
    at rank 2 (3×3, with row/column scaling); at (0, 0) V is only the decayed
    history β2(1-β2), 4^63 below the new G² term, which the step must rescale
    by exactly 4^-63 (the exponent's clamp is at ±63): the update there is
    Adam's with G = 0."""
    b1, b2, lr, eps = 0.9, 0.99, 0.1, 1e-8
    p = nn.Parameter(torch.zeros(n, n, dtype=torch.float64))
    opt = la.Adapprox([{"params": [p], "rank": 2}], lr=lr, betas=(b1, b2), eps=eps, err_tol=0.0,
                      clip_threshold=None)
    g1 = torch.zeros(n, n, dtype=torch.float64)
    g1[0, 0] = 1.0
    g2 = torch.zeros(n, n, dtype=torch.float64)
    g2[1, 1] = 2.0 ** 63
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    assert ("V" in opt.state[p]) == (n == 2) and opt.ranks() == [2]
    d1 = 1.0 / (1.0 + eps)  # step 1 at (0, 0): M̂ = 1, V̂ = 1
    d2 = (b1 * (1 - b1) / (1 - b1**2)) / ((b2 * (1 - b2) / (1 - b2**2)) ** 0.5 + eps)  # step 2: G = 0 there
    torch.testing.assert_close(p.detach()[0, 0], torch.tensor(-lr * (d1 + d2), dtype=torch.float64),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("rank_init", [None, 2], ids=["full", "factored"])
def test_adapprox_a_gradient_without_positive_entries_steps_as_its_mirror_image(rank_init):
    """Adam is odd in G (V depends on G², M on G): from W0 = 0 a run on
    gradients with no positive entry (all negative, or negative and zero)
    ends exactly at minus the run on their mirror images, and is finite."""
    g = torch.Generator().manual_seed(0)
    shape = (6, 8)
    grads = [-(torch.rand(shape, generator=g) + 0.5) for _ in range(3)]
    grads[1][0] = 0.0  # no positive entry, the largest is 0
    results = []
    for sign in (1.0, -1.0):
        p = nn.Parameter(torch.zeros(shape))
        opt = la.Adapprox([p], lr=1e-2, k_max_frac=1.0, rank_init=rank_init, err_tol=0.0)
        for gr in grads:
            p.grad = sign * gr
            opt.step()
        results.append(p.detach().clone())
    assert torch.isfinite(results[0]).all() and results[0].abs().max() > 0
    assert torch.equal(results[0], -results[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_adapprox_factor_dtype_follows_the_option_the_parameter_and_the_device(dtype):
    # float64 when asked (the default) or for a float64 parameter; on MPS, which has no float64, float32
    # (a stand-in for an MPS parameter: the method reads only its dtype and device)
    want = {name: torch.float64 if name == "float64" or dtype == torch.float64 else torch.float32
            for name in ("float32", "float64")}
    for name in ("float32", "float64"):
        assert la.Adapprox.factor_dtype(torch.zeros(2, 2, dtype=dtype), {"factor_dtype": name}) == want[name]
        mps = types.SimpleNamespace(dtype=dtype, device=torch.device("mps"))
        assert la.Adapprox.factor_dtype(mps, {"factor_dtype": name}) == (
            torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("key,value", [("k_max_frac", 0.0), ("k_max_frac", 1.5), ("k_min", 0), ("err_tol", -1.0),
                                       ("rank_step", 0), ("oversample", -1), ("power_iters", -1),
                                       ("clip_threshold", 0.0), ("rank_init", 0), ("err_beta", 1.0),
                                       ("factor_dtype", "bfloat16"), ("factor_dtype", torch.float64)])
def test_adapprox_invalid_options(key, value):
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        la.Adapprox([nn.Parameter(torch.randn(4, 4))], **{key: value})


def test_adapprox_random_stream_is_counter_based_and_resumes_anywhere():
    # Ω of parameter i at step t comes from stream_seed(seed, i, t) alone, so a
    # state dict holds no generator state and no device name, and a replica
    # that loads it (another rank, another device, other global RNG state,
    # another seed in its constructor) continues exactly.
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(10, 14)), nn.Parameter(torch.randn(9, 6))]
    opt = la.Adapprox(ps, rank_init=2)
    grads = [[torch.randn(p.shape) for p in ps] for _ in range(6)]
    for gs in grads[:3]:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd) == {"state", "param_groups"}
    assert all(isinstance(v, (torch.Tensor, int, float)) for st_ in sd["state"].values() for v in st_.values())
    assert sd["state"][0]["seed"] != sd["state"][1]["seed"]  # each matrix has its own stream
    torch.manual_seed(12345)
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = la.Adapprox(qs, rank_init=2, seed=999)  # the loaded seeds must win
    opt2.load_state_dict(sd)
    for gs in grads[3:]:
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


def test_adapprox_seed_changes_the_sketches():
    runs = []
    for seed in (0, 0, 1):
        g = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn(12, 16, generator=g))
        opt = la.Adapprox([p], rank_init=2, power_iters=0, seed=seed)
        for _ in range(3):
            p.grad = torch.randn(12, 16, generator=g)
            opt.step()
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_stream_seed_is_a_spread_function_of_its_counters():
    seeds = {la.stream_seed(s, i, t) for s in range(3) for i in range(10) for t in range(10)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)
    assert la.stream_seed(0, 1, 2) == la.stream_seed(0, 1, 2) != la.stream_seed(0, 2, 1)


@CUDA
def test_adapprox_cuda_checkpoint_continues_on_cpu():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(10, 14, device="cuda"))
    opt = la.Adapprox([p], rank_init=2)
    for _ in range(3):
        p.grad = torch.randn(10, 14, device="cuda")
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    results = []
    for _ in range(2):  # two CPU replicas loaded from the CUDA checkpoint stay identical
        buf.seek(0)
        q = nn.Parameter(p.detach().cpu().clone())
        opt2 = la.Adapprox([q], rank_init=2)
        opt2.load_state_dict(torch.load(buf, weights_only=True, map_location="cpu"))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            q.grad = torch.randn(10, 14, generator=g)
            opt2.step()
        results.append(q.detach())
    assert torch.isfinite(results[0]).all() and torch.equal(results[0], results[1])


def first_step_with_a_small_row(**options):
    """One rank-1 Adapprox step (lr 1, no clipping) on a 6×8 gradient of order 1 whose row 0 is
    1e-6 times smaller. Returns the optimizer, the parameter, W0, G and |W0 - W1|."""
    g = torch.Generator().manual_seed(0)
    G = torch.rand(6, 8, generator=g, dtype=torch.float64) + 0.5
    G[0] *= 1e-6
    W0 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    p = nn.Parameter(W0.clone())
    opt = la.Adapprox([p], lr=1.0, betas=(0.9, 0.999), k_max_frac=1 / 6, err_tol=0.0, clip_threshold=None,
                      **options)
    p.grad = G.clone()
    opt.step()
    return opt, p, G, (W0 - p.detach()).abs()


def test_adapprox_floors_entries_below_the_factorization_error():
    # Without row/column scaling: rows 1..5 carry gradients of order 1, row 0 of order 1e-6: its
    # V is ~1e-12, far below the rank-1 factorization's RMS error δ. There V̂ says nothing about
    # V, so V̂ is floored at δ and that row moves by at most lr·|G|/sqrt(δ/(1-β2)) (first step:
    # M̂ = G), not by a full Adam step of size lr driven by the factorization's error.
    opt, p, G, moved = first_step_with_a_small_row(row_col_scaling=False)
    V = (1 - 0.999) * G * G
    Q, U = opt.state[p]["Q"], opt.state[p]["U"] * 4.0 ** opt.state[p]["u_exp"]
    delta = (torch.linalg.norm(V - Q @ U.T) / math.sqrt(V.numel())).item()
    assert delta > 1e-9  # far above row 0's V (~1e-15): rank 1 cannot resolve it
    bound = G[0].abs() / math.sqrt(delta / (1 - 0.999))
    assert (moved[0] <= bound * (1 + 1e-9)).all() and moved[0].max() < 1e-3
    assert moved[1:].mean() > 0.3  # the resolved rows take Adam-sized steps


def test_adapprox_row_col_scaling_resolves_a_row_a_million_times_smaller():
    # The same gradients with row/column scaling (the default): V is divided by its rows' and
    # columns' sums before it is factored, so row 0, 1e-6 below the others in G, is as well
    # resolved as they are, and every row takes an Adam-sized first step (|D| = |G|/|G| = 1 where
    # V̂ = V; the rank-1 factorization of the scaled V is close to exact here).
    opt, p, _, moved = first_step_with_a_small_row()
    assert 0.5 < moved[0].mean() < 2.0 and 0.5 < moved[1:].mean() < 2.0
    state = opt.state[p]
    assert state["row"].shape == (6,) and state["col"].shape == (8,)
    assert state["row"].sum().item() == pytest.approx(1.0, rel=1e-6) and state["row"][0] < 1e-10


def test_adapprox_rank_settles_geometrically_then_steps():
    # V of rank 1: from k_max = 32 the rank halves each step (32, 16, 8, 4, 2, 1) instead of
    # falling by rank_step, so it reaches its working level in log2(k_max) steps, not k_max.
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(64, 96, generator=g))
    u, v = torch.rand(64, 1, generator=g) + 0.5, torch.rand(1, 96, generator=g) + 0.5
    opt = la.Adapprox([p], lr=1e-3, k_max_frac=0.5)
    history = [opt.ranks()[0]]
    for _ in range(8):
        p.grad = u @ v * (1 + 0.1 * torch.rand(1, generator=g).item())
        opt.step()
        history.append(opt.ranks()[0])
    assert history == [32, 16, 8, 4, 2, 1, 1, 1, 1]
    # once settled (ξ̄ >= err_tol/2 once), it moves by rank_step only: no halving/doubling flaps
    p2 = nn.Parameter(torch.randn(16, 24, generator=g))
    opt2 = la.Adapprox([p2], lr=1e-3, k_max_frac=0.5, err_tol=0.3)
    ranks = [opt2.ranks()[0]]
    for _ in range(20):
        p2.grad = torch.randn(16, 24, generator=g)
        opt2.step()
        ranks.append(opt2.ranks()[0])
    settled = next(i for i, s in enumerate(ranks) if i > 0 and s >= ranks[i - 1])
    assert all(abs(b - a) <= 1 for a, b in zip(ranks[settled:], ranks[settled + 1:]))


FSDP2_LAYERWISE = """
# Layer-wise updates (run after FSDP2_SCRIPT's cases, with its model, optimizers and data)
# 1. FSDP2 calls a sharded parameter's post-accumulate-grad hook itself, after the reduce-scatter
seen = {}
m = sharded()
for p in m.parameters():
    p.register_post_accumulate_grad_hook(lambda p: seen.setdefault(id(p), (type(p.grad).__name__, p.grad.to_local().clone())))
nn.functional.mse_loss(m(x), y).backward()
layerwise_out = {"hooks": [seen[id(p)][0] == "DTensor" and torch.equal(seen[id(p)][1], p.grad.to_local())
                 for p in m.parameters()]}
# 2. layer-wise updates (stepped inside backward, one parameter at a time) equal ordinary FSDP2 steps
for name, opts in [("GaLoreAdamW", {}), ("GaLoreAdamW", dict(subspace="random", residual=True)), ("LDAdam", {}),
                   ("Adapprox", {})]:
    ordinary, layerwise = sharded(), sharded()
    opt, opt_l = optimizer(name, opts, ordinary), optimizer(name, opts, layerwise)
    handles = engine.layerwise_hooks(opt_l)
    freed = True
    for _ in range(5):  # refreshes at steps 1 and 4
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(ordinary(x), y).backward()
        opt.step()
        nn.functional.mse_loss(layerwise(x), y).backward()
        freed &= all(p.grad is None for p in layerwise.parameters())
    layerwise_out[f"{name} {sorted(opts.items())}"] = dict(
        freed=freed, ordinary=[p.full_tensor() for p in ordinary.parameters()],
        layerwise=[p.full_tensor() for p in layerwise.parameters()], ranks=(opt.ranks(), opt_l.ranks()),
        state=(la.state_bytes(opt, by_key=True), la.state_bytes(opt_l, by_key=True)))
torch.save(layerwise_out, os.path.join(sys.argv[2], f"layerwise{dist.get_rank()}.pt"))
"""


def test_fsdp2_layerwise_updates_equal_ordinary_fsdp2_steps(fsdp2_runs):
    # FSDP2 runs a sharded parameter's post-accumulate-grad hooks itself, right
    # after its gradient's reduce-scatter, in the same order on every rank; so
    # layerwise_hooks steps each parameter there (one collective fsdp2_step each)
    per_rank = [torch.load(fsdp2_runs / f"layerwise{r}.pt", weights_only=False) for r in (0, 1)]
    for r in per_rank:
        assert r.pop("hooks") == [True] * 10  # fired on every parameter, with its reduced DTensor gradient
        assert len(r) == 4
        for case, res in r.items():
            assert res["freed"], case  # no gradient outlives its update
            assert all(torch.equal(a, b) for a, b in zip(res["ordinary"], res["layerwise"])), case
            assert res["ranks"][0] == res["ranks"][1] and res["state"][0] == res["state"][1], case
    assert all(all(torch.equal(a, b) for a, b in zip(per_rank[0][c]["layerwise"], per_rank[1][c]["layerwise"]))
               for c in per_rank[0])  # the same full weights on both ranks


# -- mutation hunt: behaviours of the restructured steps --


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_a_model_made_complex_after_construction_is_refused_before_anything_changes(cls):
    # add_param_group refuses complex parameters; model.to(torch.complex64) afterwards keeps the
    # parameter objects, so step() meets complex gradients: refused before any state or weight changes
    model = mlp()
    opt = cls(mlp_groups(model, cls=cls), **kwargs_for(cls))
    train(model, opt, 2, regression_data())
    with warnings.catch_warnings():  # torch's note that complex modules are new
        warnings.simplefilter("ignore")
        model.to(torch.complex64)
    x, y = regression_data()
    (model(x.to(torch.complex64)).abs() - y).square().mean().backward()
    state, weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="does not support complex gradients"):
        opt.step()
    assert_same_state(state, opt.state_dict())
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_a_bf16_dense_parameter_takes_adamw_steps_from_float32_moments():
    # A bf16 parameter beside a float32 one in one dense group: its moments are float32 (the float64
    # EMAs of its gradients, to float32 rounding), and each step moves the weight by AdamW's update
    # computed from them, to within the bf16 roundings (2^-8 relative each) of the decayed weight, the
    # update and their sum
    g = torch.Generator().manual_seed(0)
    w16 = nn.Parameter((0.5 * torch.randn(64, generator=g)).bfloat16())
    w32 = nn.Parameter(torch.randn(8, generator=g))
    lr, (b1, b2), eps, wd = 0.05, (0.9, 0.99), 1e-8, 0.1
    opt = la.GaLoreAdamW([w32, w16], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    m = v = torch.zeros(64, dtype=torch.float64)
    for t in range(1, 6):
        grad = torch.randn(64, generator=g).bfloat16()
        w16.grad, w32.grad = grad.clone(), torch.randn(8, generator=g)
        before = w16.detach().double()
        opt.step()
        G = grad.double()
        m, v = b1 * m + (1 - b1) * G, b2 * v + (1 - b2) * G * G
        state = opt.state[w16]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(state["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-9)
        update = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        expected = before * (1 - lr * wd) - update
        bound = 2.0**-8 * (before.abs() + update.abs() + expected.abs()) + 1e-6
        assert ((w16.detach().double() - expected).abs() <= bound).all()
        assert w16.dtype == torch.bfloat16


def test_random_subspace_keeps_each_drawn_basis_as_drawn():
    # subspace="random": P at each refresh is orth(Ω) (diag(R) >= 0) of that step's draw, from
    # stream_seed(stream_seed(seed, index), t), its columns not re-signed like the previous basis (the
    # moments follow P through C = P_newᵀ P_old, so a column's sign is no convention to keep). A dense
    # parameter without a gradient comes first: the matrix's index is 1.
    shape, seed = (9, 4), 5
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = nn.Parameter(W0.clone())
    opt = la.GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(3, dtype=torch.float64))]},
                          {"params": [p], "rank": 2, "update_proj_gap": 3, "subspace": "random"}],
                         lr=0.05, betas=(0.9, 0.99), seed=seed)
    for t, G in enumerate(gapped_grads(shape, 10), start=1):
        p.grad = G.clone()
        opt.step()
        if t % 3 == 1:
            gen = torch.Generator().manual_seed(la.stream_seed(la.stream_seed(seed, 1), t))
            drawn = signed_qr(torch.randn(min(shape), 2, generator=gen, dtype=torch.float64))
            torch.testing.assert_close(opt.state[p]["P"], drawn, atol=1e-12, rtol=0)


@pytest.mark.parametrize("ranks", [(2, 3), (3, 1)], ids=["raised", "lowered"])
def test_gha_takes_a_changed_group_rank_at_the_next_refresh(ranks):
    # subspace="gha" keeps at a refresh the basis Sanger's rule has tracked, unless the group's rank
    # changed: then the refresh reads a basis of the new rank off X (the top-r SVD, as at its first
    # step), and the moments follow it from the basis they are in (C = P_newᵀ P_ref)
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(6, 10, generator=g, dtype=torch.float64))
    opt = la.GaLoreAdamW([{"params": [p], "rank": ranks[0], "update_proj_gap": 3, "subspace": "gha"}], lr=1e-2,
                         betas=(0.9, 0.99))
    for t in range(1, 7):
        if t == 3:
            opt.param_groups[0]["rank"] = ranks[1]
        p.grad = torch.randn(6, 10, generator=g, dtype=torch.float64)
        state = opt.state[p]
        P_ref, m_before = state.get("P_ref"), state.get("exp_avg")
        opt.step()
        r = ranks[0] if t < 4 else ranks[1]
        assert opt.ranks() == [r] and state["P"].shape[1] == state["P_ref"].shape[1] == state["exp_avg"].shape[0] == r
        if t == 4:  # the refresh: P_ref is the new basis, X = G (6×10: P spans the rows)
            X = p.grad
            assert energy_kept(state["P_ref"], X) == pytest.approx(energy_kept(top_r_basis(X, r), X), abs=1e-10)
            C = state["P_ref"].T @ P_ref
            torch.testing.assert_close(state["exp_avg"], 0.9 * (C @ m_before) + 0.1 * (state["P_ref"].T @ X))


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_the_residuals_state_has_the_same_keys_with_the_limiter_on_or_off(cls):
    # The limiter's history (``rms``) is in every state of the residual, 0 while the limiter is off: a
    # state dict of either loads into the other (dcp.load fills the keys a state already has), and a
    # limiter switched on starts without history
    keys = {}
    for gamma in (None, 1.01):
        model = mlp()
        opt = cls(mlp_groups(model), **kwargs_for(cls, residual=True, norm_growth_limit=gamma))
        train(model, opt, 3, regression_data())
        keys[gamma] = [sorted(opt.state[p]) for p in model.parameters()]
        if gamma is None:
            assert all(opt.state[p]["rms"].item() == 0.0 for p in (model[0].weight, model[2].weight))
    assert keys[None] == keys[1.01]
    assert "rms" in keys[None][0] or "rms" in keys[None][2]  # (the two low-rank weights)


@pytest.mark.parametrize("cls, options", [(la.GaLoreAdamW, {}), (la.GaLoreAdamW, dict(refresh="randomized")),
                                          (la.GaLoreAdamW, dict(subspace="random")),
                                          (la.GaLoreAdamW, dict(subspace="gha")), (la.AdaptiveAdamW, {}),
                                          (la.AdaptiveAdamW, dict(refresh="randomized"))],
                         ids=["GaLoreAdamW", "GaLoreAdamW-randomized", "GaLoreAdamW-random", "GaLoreAdamW-gha",
                              "AdaptiveAdamW", "AdaptiveAdamW-randomized"])
def test_a_state_made_by_a_zero_gradient_step_has_the_keys_of_a_trained_one(cls, options):
    # torch's get_optimizer_state_dict on a fresh optimizer steps once with zero gradients and lr 0 to
    # create the state, into which dcp.load then loads a checkpoint key by key: that state must hold
    # every key a trained one holds, or the saved value of a missing key would be left behind
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    fresh_model, trained_model = mlp(), mlp()
    fresh = cls(mlp_groups(fresh_model), **kwargs_for(cls, residual=True, **options))
    trained = cls(mlp_groups(trained_model), **kwargs_for(cls, residual=True, **options))
    get_optimizer_state_dict(fresh_model, fresh)
    train(trained_model, trained, 7, regression_data())
    assert [sorted(fresh.state[p]) for p in fresh_model.parameters()] == [
        sorted(trained.state[p]) for p in trained_model.parameters()]


@pytest.mark.parametrize("stagger", [False, True], ids=["together", "stagger"])
def test_adaptive_keeps_each_refreshed_spectrum_only_with_stagger_and_in_its_checkpoint_layout(stagger):
    # With stagger each matrix keeps the spectrum and the energy ‖X‖² of its last refresh for the
    # allocations until its next one: min(m, n) + 1 numbers, the energy a 1-element vector (the layout
    # of the checkpoints written so far: dcp.load matches shapes). Without stagger every matrix
    # refreshes at once and nothing is kept.
    model = mlp()
    opt = la.AdaptiveAdamW(mlp_groups(model), lr=1e-2, update_proj_gap=3, stagger=stagger)
    x, y = regression_data()
    grads = {}
    for t in range(1, 5):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        grads[t] = [model[0].weight.grad.clone(), model[2].weight.grad.clone()]
        opt.step()
    group = opt.param_groups[1]
    for k, (p, index) in enumerate([(model[0].weight, 4), (model[2].weight, 5)]):
        state = opt.state[p]
        if not stagger:
            assert "spectrum" not in state and "energy" not in state
            continue
        last = max(t for t in range(1, 5) if la.refresh_due(t, index, group))
        G = grads[last][k]
        assert state["spectrum"].shape == (min(p.shape),) and state["energy"].shape == (1,)
        torch.testing.assert_close(state["spectrum"], torch.linalg.svdvals(G), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state["energy"], G.square().sum().reshape(1), rtol=1e-5, atol=0)


def test_adaptive_group_outside_the_allocation_takes_a_changed_rank_at_the_next_refresh():
    # allocate=False: the group's own rank, raised (2 → 4) or lowered (4 → 1) between steps, takes
    # effect at the next refresh, as in GaLoreAdamW
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(6, 10, generator=g, dtype=torch.float64))
    opt = la.AdaptiveAdamW([{"params": [p], "rank": 2, "allocate": False, "update_proj_gap": 3}], lr=1e-2,
                           betas=(0.9, 0.99))
    for t, rank in zip(range(1, 8), [2, 2, 4, 4, 4, 1, 1]):
        opt.param_groups[0]["rank"] = rank
        p.grad = torch.randn(6, 10, generator=g, dtype=torch.float64)
        opt.step()
        assert opt.ranks() == [{1: 2, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1}[t]]
        assert opt.state[p]["P"].shape[1] == opt.state[p]["exp_avg"].shape[0] == opt.ranks()[0]


def test_adapprox_k_min_raised_between_steps_holds_at_the_next_step():
    # like a lowered cap, a group's k_min raised above the current rank lifts it before the next step
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(9, 6, generator=g))
    opt = la.Adapprox([p], lr=1e-2, k_max_frac=1.0, rank_init=2, err_tol=10.0)  # err_tol 10: halved at once
    p.grad = torch.randn(9, 6, generator=g)
    opt.step()
    assert opt.ranks() == [1]
    opt.param_groups[0]["k_min"] = 4
    p.grad = torch.randn(9, 6, generator=g)
    opt.step()
    assert opt.state[p]["Q"].shape[1] == 4 and opt.ranks() == [4]  # step 2 factored at rank 4, not 1


def test_adapprox_scale_exponent_follows_the_larger_of_the_gradient_and_the_root_of_the_last_v():
    # V is formed at scale 4^-h, h = ⌊log2 max(max|G|, sqrt(max V_{t-1}))⌋ (state ``u_exp``): when the
    # gradient falls 2^-30, h follows the history in V, not the new gradient (a dense V: full rank)
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    opt = la.Adapprox([p], lr=1e-2, betas=(0.9, 0.99), k_max_frac=1.0, err_tol=0.0, clip_threshold=None)
    V = torch.zeros(5, 7, dtype=torch.float64)
    for scale in (3.0, 3.0, 2.0**-30, 2.0**-30):
        G = torch.randn(5, 7, generator=g, dtype=torch.float64) * scale
        expected = math.floor(math.log2(max(G.abs().max().item(), V.max().sqrt().item())))
        V = 0.99 * V + 0.01 * G * G
        p.grad = G.clone()
        opt.step()
        assert "V" in opt.state[p] and opt.state[p]["u_exp"].item() == expected


def test_adapprox_row_col_scaling_switched_off_between_steps_drops_the_scales():
    # A factored V keeps diag(r) and diag(c) outside Q Uᵀ: switched off, the next step reads V_{t-1} with
    # them, stores Q and U alone and frees the scales, which never touch V again. G² of rank 1 and k = 2:
    # the factorization is exact, so V is the EMA of G² at every step.
    g = torch.Generator().manual_seed(0)
    u, v = torch.rand(6, 1, generator=g, dtype=torch.float64) + 0.5, torch.rand(1, 8, generator=g,
                                                                            dtype=torch.float64) + 0.5
    p = nn.Parameter(torch.zeros(6, 8, dtype=torch.float64))
    opt = la.Adapprox([{"params": [p], "rank": 2}], lr=1e-2, betas=(0.9, 0.99), k_min=2)
    V = torch.zeros(6, 8, dtype=torch.float64)
    for t in range(1, 6):
        if t == 3:
            opt.param_groups[0]["row_col_scaling"] = False
        G = u @ v * (1 + t)
        V = 0.99 * V + 0.01 * G * G
        p.grad = G.clone()
        opt.step()
        state = opt.state[p]
        assert ("row" in state) == ("col" in state) == (t < 3)
        Q, U = state["Q"], state["U"]
        if "row" in state:
            Q, U = Q * state["row"][:, None], U * state["col"][:, None]
        torch.testing.assert_close(Q @ U.T * 4.0 ** state["u_exp"], V, rtol=1e-9, atol=1e-12)


def test_adapprox_abs_rule_takes_the_magnitude_of_negative_entries_of_the_factorization():
    # A rank-2 Q Uᵀ of a V with uneven entries dips below zero by more than the floor δ: nonneg="abs"
    # (the default) takes |Q Uᵀ| there, as the float64 reference does, which differs from "clamp"
    g = torch.Generator().manual_seed(22)
    shape = (7, 9)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape, generator=g,
                                                                            dtype=torch.float64).pow(3)
             for _ in range(3)]
    W0 = torch.zeros(shape, dtype=torch.float64)
    kw = dict(lr=1.0, betas=(0.0, 0.99), eps=1e-8, wd=0.0, k_init=2, k_max=2, err_tol=0.0, err_beta=0.7,
              oversample=2, power_iters=1, warm_start=True, clip=None, guidance=False, seed=7)
    expected = adapprox_reference(W0, grads, nonneg="abs", **kw)[0]
    assert (expected - adapprox_reference(W0, grads, nonneg="clamp", **kw)[0]).abs().max() > 1e-3
    p = nn.Parameter(W0.clone())
    opt = la.Adapprox([{"params": [p], "rank": 2}], lr=1.0, betas=(0.0, 0.99), eps=1e-8, k_min=2, err_tol=0.0,
                      err_beta=0.7, oversample=2, power_iters=1, clip_threshold=None, seed=7)
    for G in grads:
        p.grad = G.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), expected, atol=1e-9, rtol=1e-9)


def test_adapprox_rank_holds_while_the_error_equals_err_tol():
    # k grows only while ξ̄ is above err_tol, and falls only below err_tol/2: with err_tol = 0 and
    # all-zero gradients (ξ = 0: a zero V is exact) the rank holds
    p = nn.Parameter(torch.randn(9, 6))
    opt = la.Adapprox([p], lr=1e-2, k_max_frac=1.0, rank_init=2, err_tol=0.0)
    for _ in range(3):
        p.grad = torch.zeros(9, 6)
        opt.step()
        assert opt.ranks() == [2] and opt.state[p]["err_ema"] == 0.0


def test_adapprox_state_without_the_descent_flag_continues_settled():
    # A state written before the flag ``descending`` existed is past its first step: it continues with the
    # settled rule (ξ̄ an EMA, k ± rank_step), as the run that wrote it did
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(16, 24, generator=g))
    opt = la.Adapprox([p], lr=1e-3, k_max_frac=0.5, err_tol=0.3)
    grads = [torch.randn(16, 24, generator=g) for _ in range(8)]
    for G in grads[:4]:
        p.grad = G.clone()
        opt.step()
    assert opt.state[p]["descending"] is False
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["descending"]
    q = nn.Parameter(p.detach().clone())
    opt2 = la.Adapprox([q], lr=1e-3, k_max_frac=0.5, err_tol=0.3)
    opt2.load_state_dict(sd)
    for G in grads[4:]:
        p.grad, q.grad = G.clone(), G.clone()
        opt.step()
        opt2.step()
        assert opt2.ranks() == opt.ranks() and opt2.state[q]["err_ema"] == opt.state[p]["err_ema"]
    assert torch.equal(p, q)


def test_adapprox_first_descent_falls_by_at_least_rank_step():
    # k ← max(k_min, min(k - rank_step, ⌊k/2⌋)): from k = 4 with rank_step 3, an exact V (G² of rank 1)
    # takes the rank to 1 in one step, not to ⌊4/2⌋ = 2
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(12, 16, generator=g))
    opt = la.Adapprox([p], lr=1e-3, k_max_frac=0.5, rank_init=4, rank_step=3)
    p.grad = (torch.rand(12, 1, generator=g) + 0.5) @ (torch.rand(1, 16, generator=g) + 0.5)
    opt.step()
    assert opt.ranks() == [1]


def test_adapprox_dense_v_switched_to_a_rank_starts_at_rank_init_as_a_fresh_factored_v():
    # A dense V (rank=None) switched to rank=4 is factored from the next step as a fresh factored V is:
    # from rank_init (2), not from the cap; err_tol = 0 grows it by one a step
    def rank_history(ranks):
        g = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn(9, 6, generator=g))
        opt = la.Adapprox([{"params": [p], "rank": ranks[0]}], lr=1e-2, rank_init=2, err_tol=0.0)
        history = []
        for rank in ranks:
            opt.param_groups[0]["rank"] = rank
            p.grad = torch.randn(9, 6, generator=g)
            opt.step()
            history.append((opt.ranks(), opt.state[p]["Q"].shape[1] if "Q" in opt.state[p] else None))
        return history

    fresh = rank_history([4, 4, 4])
    assert [k for _, k in fresh] == [2, 3, 4]
    assert rank_history([None, None, 4, 4, 4]) == [([], None), ([], None)] + fresh


def test_peers_gather_sends_host_numbers_and_orders_every_ranks_records_by_index(monkeypatch):
    # Under FSDP2, AdaptiveAdamW's allocation gathers (index, spectrum, energy, cap, metric) records from
    # every rank: their tensors cross as floats and lists of floats (all_gather_object would pickle a
    # tensor with its device), and the merged records come back ordered by parameter index. The
    # collective here stands in for two ranks; the other one sends one record.
    sent = []
    other = [(1, [3.0, 1.0], 10.0, 2, "explained_variance")]

    def all_gather_object(out, obj, group=None):
        sent.append(obj)
        out[:] = [copy.deepcopy(obj), other]

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    records = [(4, torch.tensor([2.0, 0.5]), torch.tensor(4.25), 2, "explained_variance"),
               (0, torch.tensor([1.0]), torch.tensor(1.0), 1, "explained_variance")]
    out = engine.Peers(None, torch.device("cpu")).gather(records)
    assert len(sent) == 1 and not any(isinstance(v, torch.Tensor) for r in sent[0] for v in r)
    assert out == [(0, [1.0], 1.0, 1, "explained_variance"), other[0],
                   (4, [2.0, 0.5], 4.25, 2, "explained_variance")]


@pytest.mark.parametrize("subspace", ["svd", "gha"])
def test_a_run_resumed_through_dcp_load_into_a_fresh_optimizer_continues_exactly(subspace, tmp_path):
    # dcp.load fills the state that torch's get_optimizer_state_dict creates with one zero-gradient
    # step: a key missing there (GHA's P_ref) would keep its fresh value, and the moments would
    # then follow the basis from the wrong one at the next refresh
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    torch.manual_seed(0)
    x = torch.randn(16, 8)

    def make(model):
        return la.GaLoreAdamW([{"params": [model.weight], "rank": 2}], lr=1e-2, update_proj_gap=3, subspace=subspace)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            model(x).sin().sum().backward()
            opt.step()

    a = nn.Linear(8, 6, bias=False)
    opt_a = make(a)
    steps(a, opt_a, 5)
    dcp.save({"o": get_optimizer_state_dict(a, opt_a)}, checkpoint_id=str(tmp_path))
    b = nn.Linear(8, 6, bias=False)
    b.load_state_dict(a.state_dict())
    opt_b = make(b)
    template = {"o": get_optimizer_state_dict(b, opt_b)}
    dcp.load(template, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(b, opt_b, template["o"])
    steps(a, opt_a, 3)
    steps(b, opt_b, 3)
    assert torch.equal(a.weight, b.weight)


def test_a_bf16_weight_takes_its_float32_update_rounded_once():
    # W + update in float32, rounded once into the bf16 weight (as torch's float32 AdamW then a
    # cast): 1 + 2^-8 (1 + 2^-9) rounds up to 1 + 2^-7. Rounding the update to bf16 first (2^-8)
    # would leave 1 + 2^-8, a tie that rounds to even: 1, the update lost.
    lr = 2**-8 * (1 + 2**-9)
    w = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = la.GaLoreAdamW([w], lr=lr)
    w.grad = -torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    ref = nn.Parameter(torch.ones(4))
    torch_opt = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    ref.grad = -torch.ones(4)
    torch_opt.step()
    assert torch.equal(w.detach(), ref.detach().to(torch.bfloat16))
    assert w[0].item() == 1 + 2**-7


# -- found by a mutation hunt: the core and GaLoreAdamW --


def splitmix64(state):
    """SplitMix64 (Steele, Lea and Flood 2014, as in Vigna's splitmix64.c): the next state and output."""
    mask = 2**64 - 1
    state = (state + 0x9E3779B97F4A7C15) & mask
    z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return state, z ^ (z >> 31)


def test_stream_seed_is_splitmix64_seeded_by_the_seed_then_by_each_counter():
    # A checkpoint holds stream_seed(seed, index) and the sketches of later steps are drawn from
    # stream_seed(that, t): a stream that changed would resume an old run on other draws. Each
    # counter c reseeds SplitMix64 with (previous output) ^ c, the seed alone with seed ^ 0, and the
    # first output, halved to 63 bits, is the seed. (The generator checked on its published first
    # outputs from 1234567.)
    state, outputs = 1234567, []
    for _ in range(3):
        state, out = splitmix64(state)
        outputs.append(out)
    assert outputs == [6457827717110365317, 3203168211198807973, 9817491932198370423]

    def expected(seed, *counters):
        x = splitmix64(seed)[1]
        for c in counters:
            x = splitmix64(x ^ c)[1]
        return x >> 1

    assert la.stream_seed(0) == 0xE220A8397B1DCDAF >> 1
    for seed, counters in [(0, ()), (1234567, ()), (0, (1,)), (7, (0, 3)), (2**40 + 5, (12, 2**20)), (3, (1, 2, 3))]:
        assert la.stream_seed(seed, *counters) == expected(seed, *counters)


@pytest.mark.parametrize("cls", [la.GaLoreAdamW, la.AdaptiveAdamW], ids=ids)
def test_scale_must_be_positive_in_the_constructor_and_in_a_group(cls):
    # α scales the projected-back update: 0 (the low-rank update switched off) and below are refused,
    # as an option and per group; any positive α is taken
    p = nn.Parameter(torch.randn(6, 4))
    for bad in (0.0, -0.25):
        with pytest.raises(ValueError, match="Invalid scale"):
            cls([{"params": [p], "rank": 2}], scale=bad)
        with pytest.raises(ValueError, match="Invalid scale"):
            cls([{"params": [p], "rank": 2, "scale": bad}])
    assert cls([{"params": [p], "rank": 2}], scale=1e-12).param_groups[0]["scale"] == 1e-12


def test_a_first_step_with_a_zero_gradient_takes_the_leading_coordinate_axes_and_warm_starts_from_them():
    # An all-zero first gradient has no subspace: P is the first r coordinate axes (the leading r columns
    # of the identity), and the randomized refresh redone at step 2 is warm-started from them. With a
    # short side of 14 and rank 2 the sketch (2 + 8 columns) is narrower than the short side, so the
    # start shows in the basis and the weights, which follow galore_reference.
    shape = (20, 14)
    grads = separated_grads(shape, 5, seed=3, zero=(0,))
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(rank=2, gap=3, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, scale=0.5)
    expected = galore_reference(W0, grads, **kw, refresh="randomized", seed=11)
    p = nn.Parameter(W0.clone())
    opt = la.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 3, "scale": 0.5, "refresh": "randomized"}],
                         lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, seed=11)
    for t, G in enumerate(grads, start=1):
        p.grad = G.clone()
        opt.step()
        if t == 1:
            assert torch.equal(opt.state[p]["P"], torch.eye(14, 2, dtype=torch.float64))
    torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)
