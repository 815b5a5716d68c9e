"""Every merging method of the registries, folded through the one engine on tiny real Llama checkpoints,
against a loop-level transcription of its authors' formula: the decoupled weights of each task, entry by
entry. Also what the registries promise around the formulas: a new merge or mask rule in a few lines, modes
that refuse what they cannot keep, running merges that need nothing of old tasks, draws that do not depend
on chunking, refit and remove."""

import math

import numpy as np
import pytest
import torch

from mmer_cl import decoupled, merging, rebuild, store
from mmer_cl import fold as F
from test_checkpoints import finetune, save, state_of, tiny_llama
from test_merging import f32, ref_disjoint_mean, ref_elect_sign, ref_mask, ref_threshold, ref_ties, ref_trim, sgn

torch.set_num_threads(1)
T = 3
NAMES = [f"task{i}" for i in range(T)]


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    base = tiny_llama()
    save(base, root / "base")
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    for i in range(T):
        save(finetune(tiny_llama(), base_state, seed=30 + i, scale=0.01 * (i + 1)), root / f"ft{i}")
    return root


def fold_all(state, llamas, lams=1.0, **settings):
    lams = [lams] * T if not isinstance(lams, list) else lams
    for i in range(T):
        F.fold(state, llamas / f"ft{i}", NAMES[i], base=llamas / "base" if i == 0 else None, lam=lams[i],
               progress=False, **settings)
    return {task: decoupled.decoupled_state_dict(state, task) for task in NAMES}


def task_rows(llamas):
    """theta0 and every task vector, flat Python floats per tensor: rows[name] = [tau_0, tau_1, tau_2]."""
    base = state_of(llamas / "base")
    tuned = [state_of(llamas / f"ft{i}") for i in range(T)]
    return base, {n: [(tuned[i][n].float() - base[n].float()).flatten().tolist() for i in range(T)] for n in base}


def assert_models(models, base, reference, exact=False):
    """reference[name][t] = theta_hat_t - theta0 as a flat list, for every task t."""
    for name, theta0 in base.items():
        for t, task in enumerate(NAMES):
            want = theta0.flatten().double() + torch.tensor(reference[name][t], dtype=torch.float64)
            got = models[task][name].flatten().double()
            if exact:
                assert torch.equal(got.float(), want.float()), (name, task)
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-7, msg=f"{name}, {task}")


def same_for_all(vector):
    return [vector] * T


def test_task_arithmetic_is_its_own_continual_form(llamas, tmp_path):
    """tau_star_t = tau_star_{t-1} + alpha * tau_t in float32, in a compact state that keeps only tau_star."""
    base, rows = task_rows(llamas)
    models = fold_all(tmp_path / "s", llamas, merge="task_arithmetic", mask_rule="none", mode="compact", alpha=0.7)
    reference = {}
    for name, taus in rows.items():
        acc = [f32(f32(0.7) * v) for v in taus[0]]
        for tau in taus[1:]:
            acc = [f32(a + f32(f32(0.7) * v)) for a, v in zip(acc, tau)]
        reference[name] = same_for_all(acc)
    assert_models(models, base, reference)
    assert store.read_manifest(tmp_path / "s")["tasks"][0]["vector_files"] == []  # nothing kept per task


def test_ties_per_tensor_trim_elect_disjoint_mean(llamas, tmp_path):
    base, rows = task_rows(llamas)
    models = fold_all(tmp_path / "s", llamas, merge="ties", mask_rule="none", mode="sparse", k=0.3, alpha=1.5)
    reference = {n: same_for_all(ref_ties(taus, 0.3, 1.5, f32)) for n, taus in rows.items()}
    assert_models(models, base, reference)


def test_dare_ties_drops_with_the_counter_based_draws_then_trims(llamas, tmp_path):
    base, rows = task_rows(llamas)
    models = fold_all(tmp_path / "s", llamas, merge="dare_ties", mask_rule="none", mode="exact", p=0.5, seed=3, alpha=1.0)
    reference = {}
    for name, taus in rows.items():
        dropped = []
        for task, tau in zip(NAMES, taus):
            draws = merging.uniform(3, f"dare/{task}/{name}", 0, len(tau)).tolist()
            dropped.append([f32(v / 0.5) if u >= 0.5 else 0.0 for v, u in zip(tau, draws)])
        reference[name] = same_for_all(ref_ties(dropped, 0.2, 1.0, f32))
    assert_models(models, base, reference)


def test_tall_masks_are_strict_on_the_plain_sum(llamas, tmp_path):
    """m_t = 1[|tau_t| > lam_t * |tau_MTL - tau_t|], tau_MTL = sum_t tau_t; theta_t = theta0 + m_t * tau_MTL."""
    base, rows = task_rows(llamas)
    lams = [0.2, 0.4, 0.6]
    models = fold_all(tmp_path / "s", llamas, lams, merge="task_arithmetic", mask_rule="tall", mode="exact", alpha=1.0)
    reference = {}
    for name, taus in rows.items():
        mtl = [f32(f32(a + b) + c) for a, b, c in zip(*taus)]
        reference[name] = [[m * s for m, s in zip(ref_mask(tau, mtl, lam, f32, strict=True), mtl)]
                           for tau, lam in zip(taus, lams)]
    assert_models(models, base, reference)


def test_emr_elects_masks_and_rescales_by_per_tensor_means(llamas, tmp_path):
    """tau_uni = gamma * max_{t agrees} |tau_t| (gamma = -1 on a zero sum); m_t = 1[tau_t * tau_uni > 0];
    r_t = sum_p mean|tau_t[p]| / sum_p mean|m_t * tau_uni[p]| over the model's tensors p."""
    base, rows = task_rows(llamas)
    models = fold_all(tmp_path / "s", llamas, merge="emr", mask_rule="emr", mode="exact")
    uni, masks = {}, {}
    for name, taus in rows.items():
        column_sums = [sum(column) for column in zip(*taus)]
        gamma = [1.0 if s > 0 else -1.0 for s in column_sums]
        uni[name] = [g * max([abs(v) for v in column if sgn(v) == g] or [0.0]) for g, column in zip(gamma, zip(*taus))]
        masks[name] = [[sgn(v) * sgn(u) > 0 for v, u in zip(tau, uni[name])] for tau in taus]
    rescale = []
    for t in range(T):
        num = sum(sum(abs(v) for v in rows[n][t]) / len(rows[n][t]) for n in rows)
        den = sum(sum(abs(u) for u, m in zip(uni[n], masks[n][t]) if m) / len(uni[n]) for n in rows)
        rescale.append(num / den)
    reference = {n: [[r * m * u for m, u in zip(masks[n][t], uni[n])] for t, r in enumerate(rescale)] for n in rows}
    assert_models(models, base, reference)
    tasks = store.read_manifest(tmp_path / "s")["tasks"]
    assert [t["scale"] for t in tasks] == pytest.approx(rescale, rel=1e-6)


def test_magmax_takes_the_largest_magnitude_the_later_task_on_ties(llamas, tmp_path):
    base, rows = task_rows(llamas)
    models = fold_all(tmp_path / "s", llamas, merge="magmax", mask_rule="none", mode="exact", alpha=0.5)
    reference = {}
    for name, taus in rows.items():
        best = list(taus[0])
        for tau in taus[1:]:
            best = [v if abs(v) >= abs(b) else b for v, b in zip(tau, best)]
        reference[name] = same_for_all([f32(f32(0.5) * v) for v in best])
    assert_models(models, base, reference, exact=True)


def test_continual_ties_merges_each_model_into_the_running_vector(llamas, tmp_path):
    """tau_star_1 = alpha tau_1; tau_star_t = tau_star_{t-1} + alpha * disjoint_sum(trim_k([tau_star_{t-1}; tau_t]))."""
    base, rows = task_rows(llamas)
    models = fold_all(tmp_path / "s", llamas, merge="continual_ties", mask_rule="none", mode="compact", alpha=0.5)
    reference = {}
    for name, taus in rows.items():
        acc = [f32(f32(0.5) * v) for v in taus[0]]
        for tau in taus[1:]:
            trimmed = [ref_trim(acc, 0.2), ref_trim(tau, 0.2)]
            sign = ref_elect_sign(trimmed)
            total = [sum(r[j] for r in trimmed if r[j] != 0 and sgn(r[j]) == sign[j]) for j in range(len(sign))]
            acc = [f32(a + f32(f32(0.5) * f32(s))) for a, s in zip(acc, total)]
        reference[name] = same_for_all(acc)
    assert_models(models, base, reference)


def opcm_reference(base: dict, rows: dict, energy: float) -> dict:
    """OPCM, transcribed from its algorithm with numpy: S_1 = tau_1; S_t = S_{t-1} + P(tau_t) for weight matrices
    (P: tau's coefficients on S_{t-1}'s singular directions, diagonal and top-r block, removed), S_{t-1} + tau_t
    elsewhere; theta = theta0 + S_T * mean_t ||tau_t|| / ||S_T|| (global L2 norms)."""
    S = {n: np.array(taus[0], dtype=np.float64).reshape(base[n].shape) for n, taus in rows.items()}
    norms = [math.sqrt(sum(v * v for taus in rows.values() for v in taus[0]))]
    for t in range(1, T):
        norms.append(math.sqrt(sum(v * v for taus in rows.values() for v in taus[t])))
        for name, taus in rows.items():
            tau = np.array(taus[t], dtype=np.float64).reshape(base[name].shape)
            if tau.ndim == 2 and "embed" not in name:
                u, s, vh = np.linalg.svd(S[name], full_matrices=True)
                share = np.cumsum(s) / s.sum()
                rank = int(np.argmax(share > energy)) if (share > energy).any() else 0
                p = u.T @ tau @ vh.T
                for i in range(min(p.shape)):
                    p[i, i] = 0.0
                p[:rank, :rank] = 0.0
                tau = u @ p @ vh
            S[name] = S[name] + tau
    total = math.sqrt(sum(float((v ** 2).sum()) for v in S.values()))
    return {n: same_for_all((v * (sum(norms) / T) / total).flatten().tolist()) for n, v in S.items()}


def test_opcm_against_its_loop_level_transcription(llamas, tmp_path):
    base, rows = task_rows(llamas)
    models = fold_all(tmp_path / "s", llamas, merge="opcm", mask_rule="none", mode="compact", energy=0.5)
    assert_models(models, base, opcm_reference(base, rows, 0.5))
    manifest = store.read_manifest(tmp_path / "s")
    norms = [t["norm"] for t in manifest["tasks"]]
    assert manifest["tau_star_norm"] * manifest["tasks"][0]["scale"] == pytest.approx(sum(norms) / T, rel=1e-5)


def test_mmer_masks_on_ties(llamas, tmp_path):
    base, rows = task_rows(llamas)
    models = fold_all(tmp_path / "s", llamas, [0.5, 1.0, 2.0], merge="ties", mask_rule="mmer", mode="exact", alpha=1.5)
    reference = {}
    for name, taus in rows.items():
        star = ref_ties(taus, 0.2, 1.5, f32)
        reference[name] = [[m * s for m, s in zip(ref_mask(tau, star, lam, f32), star)] for tau, lam in zip(taus, [0.5, 1.0, 2.0])]
    assert_models(models, base, reference)  # float32 sums in another order: within rounding (test_fold: bit for bit)


# ---- what the registries promise around the formulas ---------------------------------------------------


def test_a_new_merge_and_mask_rule_in_a_few_lines_stream_through_the_fold(llamas, tmp_path):
    @merging.register_merge("mean_of_tasks")
    def mean_of_tasks(taus, alpha):
        """tau_star = alpha * mean_t tau_t"""
        return alpha * taus.mean(dim=0)

    @merging.register_mask_rule("larger_half")
    def larger_half(taus, tau_star, lams):
        """m_t = 1[|tau_t| >= |tau_star| / 2]"""
        return taus.abs() >= tau_star.abs() / 2

    try:
        base, rows = task_rows(llamas)
        models = fold_all(tmp_path / "s", llamas, merge="mean_of_tasks", mask_rule="larger_half", mode="exact")
        reference = {}
        for name, taus in rows.items():
            star = [f32(f32(f32(a + b) + c) / 3) for a, b, c in zip(*taus)]
            reference[name] = [[s if abs(v) >= abs(s) / 2 else 0.0 for v, s in zip(tau, star)] for tau in taus]
        assert_models(models, base, reference)
        decoupled.export(tmp_path / "s", "task1", tmp_path / "out")  # export and the rest come for free
        assert (tmp_path / "out" / "config.json").is_file()
    finally:
        del merging.MERGES["mean_of_tasks"], merging.MASK_RULES["larger_half"]


@pytest.mark.parametrize("mode, merge, mask_rule, message", [
    ("sparse", "emr", "emr", "needs each task's whole vector.*mode='exact'"),
    ("sparse", "task_arithmetic", "tall", None),  # a running merge needs nothing of old tasks
    ("compact", "ties", "none", "compact state keeps only tau_star"),
    ("exact", "nonsense", "mmer", "merge must be one of"),
])
def test_modes_refuse_what_they_cannot_keep(llamas, tmp_path, mode, merge, mask_rule, message):
    def attempt():
        F.fold(tmp_path / "s", llamas / "ft0", "a", base=llamas / "base", mode=mode, merge=merge, mask_rule=mask_rule,
               progress=False)
    if message is None:
        attempt()
    else:
        with pytest.raises(store.StateError, match=message):
            attempt()
        assert not (tmp_path / "s").exists() or not store.read_manifest(tmp_path / "s")


def test_refit_to_another_merge_equals_folding_it_from_the_start(llamas, tmp_path):
    fold_all(tmp_path / "a", llamas, merge="ties", mask_rule="mmer", mode="exact")
    F.refit(tmp_path / "a", merge="emr", mask_rule="emr")
    direct = fold_all(tmp_path / "b", llamas, merge="emr", mask_rule="emr", mode="exact")
    refit = {task: decoupled.decoupled_state_dict(tmp_path / "a", task) for task in NAMES}
    assert all(torch.equal(refit[t][n], direct[t][n]) for t in NAMES for n in direct[t])


def test_refit_replays_a_running_merge_in_order(llamas, tmp_path):
    fold_all(tmp_path / "a", llamas, merge="opcm", mask_rule="none", mode="exact", energy=0.5)
    F.refit(tmp_path / "a", energy=0.3)
    direct = fold_all(tmp_path / "b", llamas, merge="opcm", mask_rule="none", mode="compact", energy=0.3)
    refit = {task: decoupled.decoupled_state_dict(tmp_path / "a", task) for task in NAMES}
    for task in NAMES:
        for name in direct[task]:
            torch.testing.assert_close(refit[task][name], direct[task][name], rtol=1e-5, atol=1e-7)


def test_remove_equals_folding_without_the_task(llamas, tmp_path):
    fold_all(tmp_path / "a", llamas, merge="ties", mask_rule="mmer", mode="exact")
    F.remove(tmp_path / "a", "task1")
    for i in (0, 2):
        F.fold(tmp_path / "b", llamas / f"ft{i}", NAMES[i], base=llamas / "base" if i == 0 else None, progress=False)
    for task in ("task0", "task2"):
        a, b = (decoupled.decoupled_state_dict(tmp_path / s, task) for s in ("a", "b"))
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert [t["name"] for t in store.read_manifest(tmp_path / "a")["tasks"]] == ["task0", "task2"]
    assert not any("001-task1" in p.as_posix() for p in (tmp_path / "a").rglob("*"))


@pytest.mark.parametrize("merge, mask_rule, settings", [("dare_ties", "none", {"p": 0.3}),
                                                        ("ties", "random", {}), ("continual_ties", "mmer", {})])
def test_chunks_and_threads_change_no_draw(llamas, tmp_path, monkeypatch, merge, mask_rule, settings):
    lams = [0.4] * T if mask_rule == "random" else 1.0
    whole = fold_all(tmp_path / "whole", llamas, lams, merge=merge, mask_rule=mask_rule, mode="exact", **settings)
    monkeypatch.setattr(rebuild, "CHUNK_ELEMENTS", 48)
    monkeypatch.setattr(rebuild, "WHOLE_THRESHOLD_ELEMENTS", 600)
    chunked = fold_all(tmp_path / "chunked", llamas, lams, merge=merge, mask_rule=mask_rule, mode="exact", workers=2,
                       **settings)
    assert all(torch.equal(whole[t][n], chunked[t][n]) for t in NAMES for n in whole[t])


def test_a_random_mask_has_the_density_asked_for_where_tau_star_is_not_zero(llamas, tmp_path):
    fold_all(tmp_path / "s", llamas, [0.1, 0.5, 0.9], merge="ties", mask_rule="random", mode="exact")
    from mmer_cl import analysis

    densities = [d["effective"] for d in analysis.densities(store.load(tmp_path / "s"))]
    assert densities == pytest.approx([0.1, 0.5, 0.9], abs=0.03)


def test_ref_threshold_is_what_the_fold_trims_at(llamas, tmp_path):
    """The transcriptions above trim at the ceil(k n)-th magnitude; so does the fold (sparse keeps exactly that)."""
    _, rows = task_rows(llamas)
    F.fold(tmp_path / "s", llamas / "ft0", "a", base=llamas / "base", mode="sparse", k=0.3, progress=False)
    state = store.load(tmp_path / "s")
    vectors = state.vectors(state.task("a"))
    for name, taus in rows.items():
        kept = int((vectors.read(f"{name}::value") != 0).sum())
        assert kept == sum(1 for v in taus[0] if abs(v) >= ref_threshold([taus[0]], 0.3) and v != 0), name
    assert ref_disjoint_mean  # the transcriptions imported above are the ones test_merging checks
