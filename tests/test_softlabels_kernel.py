"""The soft-label kernel (pipeline.capture.kernel): parity with a full-logits reference, sampling
statistics, invariance to slicing / batching / threads, exact tails, architecture splitting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.capture.kernel import (
    Fidelity,
    SoftLabelKernel,
    check_split,
    draw_uniforms,
    native_built,
    native_passes,
    per_sequence_stats,
    shard_generator,
)
from pipeline.core.errors import ConfigError, InputError


def tiny_llama(vocab: int, *, hidden: int = 16, head_scale: float = 50.0, seed: int = 0):
    """A 1-layer random Llama; the head is scaled so distributions are peaked, as in real LMs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def reference(logits: torch.Tensor, method: str, k: int, u: torch.Tensor | None = None) -> dict:
    """Straightforward float64 soft labels from full (N, V) logits, in the canonical order."""
    logp = torch.log_softmax(logits.double(), -1)  # (N, V)
    p = logp.exp()
    if method == "topk":
        ids = logp.topk(k, -1).indices
    else:
        cdf = p.cumsum(-1)
        ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=logp.shape[1] - 1)
    ids = ids.sort(-1).values
    lp = logp.gather(-1, ids)
    lp, order = lp.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    covered = torch.zeros_like(p).scatter(-1, ids, 1.0).mul(p).sum(-1)
    return {
        "ids": ids,
        "logprobs": lp,
        "tail": tail,
        "covered": covered,
        "entropy": -(p * logp).sum(-1),
        "top1": p.max(-1).values,
    }


def run_kernel(model, input_ids, method, k, rows, seed=0, passes="eager"):
    kernel = SoftLabelKernel(model, method=method, k=k, head_chunk_tokens=rows, vocab_passes=passes)
    n = input_ids.numel()
    u = draw_uniforms(shard_generator(seed, "train", 0), n, k) if method == "sample" else None
    return kernel(input_ids, u).reshape(n), u


def assert_matches_reference(out, ref) -> None:
    assert torch.equal(out.ids.long(), ref["ids"])
    # fp16 storage: one rounding of the float64 value
    torch.testing.assert_close(out.logprobs.double(), ref["logprobs"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.tail.double(), ref["tail"], rtol=1e-3, atol=1e-3)
    for name in ("covered", "entropy", "top1"):
        torch.testing.assert_close(getattr(out, name).double(), ref[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("passes", ["eager", "native"])
@pytest.mark.parametrize("method", ["topk", "sample"])
@pytest.mark.parametrize(("vocab", "rows"), [(300, 7), (131_111, 5)])
def test_slices_match_full_logits_reference(method: str, vocab: int, rows: int, passes) -> None:
    """Slices of 5-7 rows (the last one short), vocab padded to BLOCK, up to 131k ids; the
    torch passes and the native ones."""
    model = tiny_llama(vocab)
    input_ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    out, u = run_kernel(model, input_ids, method, 8, rows, passes=passes)
    with torch.inference_mode():
        logits = model(input_ids).logits.reshape(-1, vocab)  # the full-logits reference
    assert_matches_reference(out, reference(logits, method, 8, u))


def test_position_t_holds_the_distribution_of_token_t_plus_1() -> None:
    """No shift: position t is the model's output at t (the prediction of token t+1)."""
    model = tiny_llama(100)
    input_ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    out, _ = run_kernel(model, input_ids, "topk", 1, 64)
    with torch.inference_mode():
        prefix = model(input_ids[:, :3]).logits[0, -1]  # sees tokens 0..2 only
    assert int(out.ids[2, 0]) == int(prefix.argmax())


def test_sampled_frequencies_match_teacher_probabilities() -> None:
    """64,000 draws from one distribution: chi-square against the teacher's probabilities."""
    vocab, n_rows, k = 200, 4000, 16
    model = tiny_llama(vocab, head_scale=60.0)
    kernel = SoftLabelKernel(model, method="sample", k=k, head_chunk_tokens=512)
    h = torch.randn(1, 16, generator=torch.Generator().manual_seed(3)).expand(n_rows, 16)
    u = draw_uniforms(shard_generator(7, "train", 0), n_rows, k)
    out = kernel.from_hidden(h.contiguous(), u)
    with torch.inference_mode():
        p = torch.softmax(model.lm_head(h[:1]).double(), -1)[0].numpy()  # (V,)
    counts = np.bincount(out.ids.reshape(-1).numpy(), minlength=vocab)
    expected = p * n_rows * k
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if (~big).any():  # pool the rare ids into one bin
        obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    z = 3.72  # one-sided p = 1e-4, Wilson-Hilferty approximation of the chi-square quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert df >= 20, "the toy distribution should spread over many ids"
    assert chi2 < critical, f"chi2={chi2:.1f} >= {critical:.1f} (df={df})"
    # duplicates are kept, adjacent, and the tail excludes each distinct id once
    ids = out.ids.long()
    assert (ids[:, 1:] == ids[:, :-1]).any()
    seen = torch.zeros(n_rows, vocab, dtype=torch.bool).scatter(-1, ids, True)
    covered = (torch.from_numpy(p)[None] * seen).sum(-1)
    torch.testing.assert_close(out.covered.double(), covered, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.tail.double(), torch.log1p(-covered), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("passes", ["eager", "fused"])
@pytest.mark.parametrize("method", ["sample", "topk"])
def test_row_groups_of_the_passes_give_the_same_bits(method: str, passes: str) -> None:
    """The passes run on cache-sized row groups: any grouping (a lone last row included)
    stores exactly the bytes of one pass over the whole slice, eager or fused."""
    vocab, rows, k = 40_000, 9, 8
    model = tiny_llama(vocab, head_scale=30.0)
    h = torch.randn(rows, 16, generator=torch.Generator().manual_seed(1))
    u = draw_uniforms(shard_generator(0, "train", 0), rows, k, "systematic")
    u = u if method == "sample" else None
    outs = []
    kernel = SoftLabelKernel(model, method=method, k=k, head_chunk_tokens=rows, vocab_passes=passes)
    for group in (rows, 2, 4, 3):
        kernel.group = group
        outs.append(kernel.from_hidden(h, u))
    for out in outs[1:]:
        for name in ("ids", "logprobs", "tail", "covered", "entropy", "top1"):
            assert torch.equal(getattr(out, name), getattr(outs[0], name)), name


@pytest.mark.parametrize("passes", ["eager", "native"])
@pytest.mark.parametrize("sampling", ["systematic", "iid"])
@pytest.mark.parametrize("vocab", [300, 40_000])
def test_sample_without_logprobs_draws_the_same_ids(sampling: str, vocab: int, passes) -> None:
    """A sample store that keeps no logprobs skips their sort and the tail: the same draws (in
    ascending order, the order the store encodes them in), the same statistics; its logprobs
    and tail are NaN, never a plausible value."""
    rows, k = 40, 16
    model = tiny_llama(vocab, head_scale=30.0)
    h = torch.randn(rows, 16, generator=torch.Generator().manual_seed(5))
    u = draw_uniforms(shard_generator(3, "train", 0), rows, k, sampling)
    full, bare = (
        SoftLabelKernel(
            model, method="sample", k=k, head_chunk_tokens=16, logprobs=keep, vocab_passes=passes
        )
        for keep in (True, False)
    )
    want, got = full.from_hidden(h, u), bare.from_hidden(h, u)
    assert torch.equal(got.ids, want.ids.sort(-1).values)
    assert bool(got.logprobs.isnan().all()) and bool(got.tail.isnan().all())
    for name in ("entropy", "top1"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.covered, want.covered, rtol=1e-6, atol=0)  # summation order
    topk = SoftLabelKernel(model, method="topk", k=k, head_chunk_tokens=16, logprobs=False)
    assert topk.logprobs  # a topk store always keeps them


@pytest.mark.parametrize("passes", ["fused", "native"])
@pytest.mark.parametrize(
    ("method", "logprobs"), [("sample", False), ("sample", True), ("topk", True)]
)
def test_fused_and_native_passes_agree_with_eager(method: str, logprobs: bool, passes) -> None:
    """`vocab_passes: fused` (one compiled read of the logits, exponentials recomputed only for
    the blocks and ids used) and `native` (pipeline/capture/_passes.c, row by row) give the
    eager passes' labels: the same ids here, statistics equal to float32 rounding, logprobs
    and tail to their float16 rounding. Rows through the threads of a stage: two threads
    calling one kernel get what one thread gets."""
    vocab, rows, k = 5_000, 48, 16
    model = tiny_llama(vocab, head_scale=30.0)
    h = torch.randn(rows, 16, generator=torch.Generator().manual_seed(6))
    u = draw_uniforms(shard_generator(1, "train", 0), rows, k, "systematic")
    u = u if method == "sample" else None
    eager, fused = (
        SoftLabelKernel(
            model, method=method, k=k, head_chunk_tokens=8, logprobs=logprobs, vocab_passes=p
        )
        for p in ("eager", passes)
    )
    want, got = eager.from_hidden(h, u), fused.from_hidden(h, u)
    assert torch.equal(got.ids, want.ids)
    for name in ("covered", "entropy", "top1"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    if logprobs:
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got.tail, want.tail, rtol=1e-3, atol=1e-3)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        halves = list(
            pool.map(
                lambda a: fused.from_hidden(h[a : a + 24], u if u is None else u[a : a + 24]),
                (0, 24),
            )
        )
    assert torch.equal(torch.cat([x.ids for x in halves]), got.ids)
    assert torch.equal(torch.cat([x.entropy for x in halves]), got.entropy)
    with torch.inference_mode():  # the passes on a lone row give that row's bits in a group
        logits = fused._logits(h[:8], None)  # (8, Vp)
        part = u if u is None else u[:8]
        group = fused._passes(logits.clone(), part)
        lone = fused._passes(logits[:1].clone(), part if part is None else part[:1])
    for a, b in zip(lone, group, strict=True):
        assert torch.equal(a, b[:1]) or bool(a.isnan().all() and b[:1].isnan().all())


def test_native_passes_are_built() -> None:
    """The install built pipeline/capture/_passes.c (setup.py; it needs a C compiler): without
    it `auto` falls back to the slower torch passes on CPU, which CI must not hide."""
    from pipeline.capture import kernel as kernel_module

    assert native_built(), f"native passes not built: {kernel_module._NATIVE_ERROR}"


def test_vocab_passes_resolution_and_errors(monkeypatch) -> None:
    """auto is fused on CUDA, native on CPU (eager where the install built no native passes);
    an unknown setting, native off the CPU or not built, or a torch.compile that cannot work on
    this machine, is an error naming the key and the way out."""
    from pipeline.capture import kernel as kernel_module

    assert kernel_module.resolve_vocab_passes("auto", "cpu") == "native"
    assert kernel_module.resolve_vocab_passes("auto", "cuda") == "fused"
    assert kernel_module.resolve_vocab_passes("fused", "cpu") == "fused"
    assert kernel_module.resolve_vocab_passes("eager", "cpu") == "eager"
    with pytest.raises(ConfigError, match=r"teacher_logits.vocab_passes: must be one of"):
        kernel_module.resolve_vocab_passes("triton", "cuda")
    with pytest.raises(
        ConfigError,
        match=r"^teacher_logits.vocab_passes: native passes run on the CPU, not cuda; set "
        r"vocab_passes: auto \(fused on CUDA\) or eager$",
    ):
        kernel_module.resolve_vocab_passes("native", "cuda")
    with monkeypatch.context() as m:
        m.setattr(kernel_module, "_native", None)
        m.setattr(kernel_module, "_NATIVE_ERROR", "No module named 'pipeline.capture._passes'")
        assert kernel_module.resolve_vocab_passes("auto", "cpu") == "eager"
        with pytest.raises(
            ConfigError,
            match=r"^teacher_logits.vocab_passes: the native passes were not built with this "
            r"install \(No module named 'pipeline.capture._passes'\); reinstall where GCC is "
            r"found \(pip install -e .\) or set vocab_passes: eager$",
        ):
            SoftLabelKernel(
                tiny_llama(100), method="sample", k=4, head_chunk_tokens=8, vocab_passes="native"
            )

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(
        ConfigError,
        match=r"teacher_logits.vocab_passes: fused passes need torch.compile on cpu, which "
        r"failed here \(.*no C\+\+ compiler found\); set vocab_passes: eager",
    ):
        SoftLabelKernel(
            tiny_llama(100), method="sample", k=4, head_chunk_tokens=8, vocab_passes="fused"
        )


def test_native_passes_are_accurate_across_the_exponential_range() -> None:
    """The native passes' own exponential (a polynomial, flushed to 0 below 2^-126) against
    float64 truth: logits spread over [-87, 0] and a peaked row, to 1e-6 relative; exp(0) is
    exactly 1 (top-1 of a one-hot row is 1, its entropy 0 and its tail -inf, flagged for the
    exact recomputation); NaN logits give valid ids; bad buffers are refused."""
    spread = torch.linspace(-87.0, 0.0, 4096)[torch.randperm(4096, generator=torch.Generator())]
    peaked = torch.randn(4096, generator=torch.Generator().manual_seed(2)) * 8
    onehot = torch.full((4096,), -200.0)
    onehot[77] = 3.0
    L = torch.stack([spread, peaked, onehot])  # (3, 4096)
    k = 16
    ids, lp, tail, covered, entropy, top1, tiny = native_passes(
        L.clone(), None, k=k, topk=True, logprobs=True
    )
    logp = torch.log_softmax(L.double(), -1)
    p = logp.exp()
    want_entropy = -(p * logp).sum(-1)
    torch.testing.assert_close(top1.double(), p.max(-1).values, rtol=1e-6, atol=0)
    torch.testing.assert_close(entropy.double()[:2], want_entropy[:2], rtol=1e-6, atol=0)
    want_covered = p.gather(-1, ids.long()).sum(-1)
    torch.testing.assert_close(covered.double(), want_covered, rtol=1e-6, atol=0)
    torch.testing.assert_close(lp.double(), logp.gather(-1, ids.long()), rtol=1e-3, atol=1e-3)
    assert float(top1[2]) == 1.0 and float(entropy[2]) == 0.0 and int(ids[2, 0]) == 77
    assert math.isinf(float(tail[2])) and tiny.tolist() == [False, False, True]
    nan = torch.full((2, 4096), math.nan)  # NaN logits: valid ids, NaN entropy (the writer
    nan[1, ::7] = 0.0  # refuses such rows, tests/test_teacher_logits.py), never a bad index
    u = draw_uniforms(shard_generator(0, "train", 0), 2, k, "systematic")
    for topk in (True, False):
        ids, *_, entropy, _, _ = native_passes(
            nan, None if topk else u, k=k, topk=topk, logprobs=True
        )
        assert bool(((ids >= 0) & (ids < 4096)).all()) and bool(entropy.isnan().all())
    with pytest.raises(ValueError, match="contiguous fp32 CPU logits"):
        native_passes(L.double(), None, k=k, topk=True, logprobs=True)
    with pytest.raises(ValueError, match=r"sample needs float64 uniforms of shape \(3, 16\)"):
        native_passes(L, torch.rand(3, 16), k=k, topk=False, logprobs=True)


def test_native_passes_give_the_same_bits_on_every_instruction_set(tmp_path) -> None:
    """The installed extension (an AVX2 clone where the CPU has it) and a build of the same file
    for the x86-64 baseline only (SSE2, no clones) store the same bytes: no fused multiply-adds,
    sums in a fixed order, so a store does not depend on the CPU that computed it."""
    import ast
    import importlib.util
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    from pipeline.capture import kernel as kernel_module

    cc = shutil.which(sysconfig.get_config_var("CC").split()[0]) or shutil.which("cc")
    assert cc, "no C compiler (the native passes need one)"
    source = Path(kernel_module.__file__).with_name("_passes.c")
    built = tmp_path / ("_passes" + sysconfig.get_config_var("EXT_SUFFIX"))
    setup_py = ast.parse((source.parents[2] / "setup.py").read_text())
    (flags,) = [
        ast.literal_eval(node.value)
        for node in setup_py.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "COMPILE_ARGS"
    ]  # setup.py's flags: the installed build's, less the clones
    subprocess.run(
        [cc, *flags, "-fPIC", "-shared", "-DSOFTLABELS_NO_CLONES"]
        + [f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(built)],
        check=True,
    )
    spec = importlib.util.spec_from_file_location("_passes", built)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    gen = torch.Generator().manual_seed(8)
    for vocab, scale, topk, k, logprobs in [
        (4096, 3.0, False, 32, True),
        (4096, 30.0, True, 32, True),
        (1000, 8.0, False, 8, False),
        (40_000, 2.0, False, 32, True),
        (300, 1.0, True, 300, True),
    ]:
        padded = -(-vocab // 64) * 64
        L = torch.randn(64, padded, generator=gen) * scale
        L[:, vocab:] = -1e30
        u = None if topk else draw_uniforms(shard_generator(2, "train", 0), 64, k, "iid")
        want = native_passes(L, u, k=k, topk=topk, logprobs=logprobs)
        try:
            kernel_module._native, installed = baseline, kernel_module._native
            got = native_passes(L, u, k=k, topk=topk, logprobs=logprobs)
        finally:
            kernel_module._native = installed
        for a, b in zip(want, got, strict=True):
            assert a.numpy().tobytes() == b.numpy().tobytes(), (vocab, topk, k)


def test_systematic_draws_are_unbiased_and_stay_within_one_of_k_p() -> None:
    """Systematic sampling: each id's count is floor(k p) or ceil(k p) in every row, its mean
    over rows is k p (unbiased), ids with k p >= 1 are always drawn; iid counts spread wider."""
    vocab, n_rows, k = 200, 4000, 16
    model = tiny_llama(vocab, head_scale=60.0)
    kernel = SoftLabelKernel(model, method="sample", k=k, head_chunk_tokens=512)
    h = torch.randn(1, 16, generator=torch.Generator().manual_seed(3)).expand(n_rows, 16)
    with torch.inference_mode():
        p = torch.softmax(model.lm_head(h[:1]).double(), -1)[0].numpy()  # (V,)
    spread = {}
    for sampling in ("systematic", "iid"):
        u = draw_uniforms(shard_generator(7, "train", 0), n_rows, k, sampling)
        ids = kernel.from_hidden(h.contiguous(), u).ids.long()  # (n_rows, k)
        counts = torch.zeros(n_rows, vocab).scatter_add_(
            -1, ids, torch.ones_like(ids, dtype=torch.float32)
        )
        dev = counts.numpy() - k * p[None]  # (n_rows, V)
        spread[sampling] = float((dev**2).mean())
        if sampling == "systematic":
            assert np.abs(dev).max() < 1 + 1e-6
            assert (counts.numpy()[:, k * p >= 1] >= 1).all()
            se = np.sqrt(k * p * (1 - np.minimum(1, k * p)) + 1e-12) / np.sqrt(n_rows)
            assert (np.abs(dev.mean(0)) < 5 * se + 1e-3).all()  # unbiased
    assert spread["systematic"] < spread["iid"] / 2
    points = draw_uniforms(shard_generator(0, "train", 0), 5, 4, "systematic")
    torch.testing.assert_close(points.diff(dim=-1), torch.full((5, 3), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown sampling 'stratified'"):
        draw_uniforms(shard_generator(0, "train", 0), 5, 4, "stratified")


@pytest.mark.parametrize("passes", ["eager", "native"])
@pytest.mark.parametrize(("vocab", "rows"), [(700, 1024), (700, 3), (40_000, 1)])
def test_results_do_not_depend_on_torch_threads(vocab: int, rows: int, passes: str) -> None:
    """Byte-identical stored arrays (ids, logprobs, tail) with 1 and 2 torch threads, including
    single-row slices of a vocabulary longer than torch's reduction grain (which torch splits
    across threads). The float32 fidelity statistics (covered, entropy, top1) may differ in the
    last bit: the BLAS behind the head matmul may block it differently by thread count (seen
    with MKL on AMD EPYC), moving a float32 logit by one ulp, which the float16 stored values
    and the ids do not see but an unrounded float32 statistic can."""
    model = tiny_llama(vocab)
    input_ids = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(4))

    def stored(out):
        return [getattr(out, f).numpy().tobytes() for f in ("ids", "logprobs", "tail")]

    threads = torch.get_num_threads()
    for method in ("topk", "sample"):
        try:
            torch.set_num_threads(2)
            two, _ = run_kernel(model, input_ids, method, 6, rows, passes=passes)
            torch.set_num_threads(1)
            one, _ = run_kernel(model, input_ids, method, 6, rows, passes=passes)
        finally:
            torch.set_num_threads(threads)
        assert stored(one) == stored(two)
        for f in ("covered", "entropy", "top1"):
            torch.testing.assert_close(getattr(one, f), getattr(two, f), rtol=1e-6, atol=1e-6)


def test_uniform_stream_is_the_same_however_it_is_drawn() -> None:
    whole = draw_uniforms(shard_generator(0, "validation", 3), 100, 4)
    g = shard_generator(0, "validation", 3)
    parts = torch.cat([draw_uniforms(g, 1, 4), draw_uniforms(g, 37, 4), draw_uniforms(g, 62, 4)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, draw_uniforms(shard_generator(0, "validation", 4), 100, 4))
    assert not torch.equal(whole, draw_uniforms(shard_generator(1, "validation", 3), 100, 4))


@pytest.mark.parametrize("passes", ["eager", "native"])
def test_tail_is_exact_when_uncovered_mass_underflows(passes: str) -> None:
    """Uncovered mass ~1e-60 underflows fp32 sums; the tail is still logsumexp (finite), and it
    is -inf once every id is stored."""
    vocab = 130
    model = tiny_llama(vocab, head_scale=1.0)
    with torch.no_grad():
        w = torch.zeros(vocab, 16)
        w[:, 0] = -torch.arange(vocab, dtype=torch.float32) * 140.0  # logit gaps of 140 nats
        model.lm_head.weight.copy_(w)
    h = torch.zeros(3, 16)
    h[:, 0] = torch.tensor([1.0, 0.5, 0.25])
    for k, expect_inf in ((2, False), (vocab, True)):
        kernel = SoftLabelKernel(
            model, method="topk", k=k, head_chunk_tokens=64, vocab_passes=passes
        )
        out = kernel.from_hidden(h, None)
        ref = reference(model.lm_head(h).detach(), "topk", k)
        assert torch.equal(out.ids.long(), ref["ids"])
        if expect_inf:
            assert torch.isneginf(out.tail.float()).all()
        else:
            assert torch.isfinite(out.tail.float()).all() and (out.tail.float() < -30).all()
            torch.testing.assert_close(out.tail.double(), ref["tail"], rtol=1e-3, atol=0.0)


def architectures() -> list:
    from transformers import (
        CodeGenConfig,
        CodeGenForCausalLM,
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GraniteConfig,
        GraniteForCausalLM,
    )

    small = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 150,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    gpt = {"n_layer": 1, "n_head": 4, "vocab_size": 150, "bos_token_id": 0, "eos_token_id": 1}
    return [
        (GPT2LMHeadModel, GPT2Config(n_embd=32, **gpt)),
        (CodeGenForCausalLM, CodeGenConfig(n_embd=32, rotary_dim=4, **gpt)),  # head with bias
        (Gemma2ForCausalLM, Gemma2Config(head_dim=16, final_logit_softcapping=0.5, **small)),
        (CohereForCausalLM, CohereConfig(logit_scale=3.0, **small)),
        (GraniteForCausalLM, GraniteConfig(logits_scaling=0.25, **small)),
    ]


@pytest.mark.parametrize("arch", range(5))
def test_other_architectures_split_exactly(arch: int) -> None:
    """Generic split (get_decoder + get_output_embeddings) with bias, softcap and logit scales."""
    cls, config = architectures()[arch]
    torch.manual_seed(0)
    model = cls(config).eval()
    kernel = SoftLabelKernel(model, method="topk", k=5, head_chunk_tokens=4)
    check_split(model, kernel)
    input_ids = torch.randint(0, 150, (1, 9), generator=torch.Generator().manual_seed(5))
    out = kernel(input_ids, None).reshape(9)
    with torch.inference_mode():
        logits = model(input_ids).logits.reshape(9, -1)
    assert_matches_reference(out, reference(logits, "topk", 5))


def test_unsplittable_model_is_refused() -> None:
    class Opaque(torch.nn.Module):
        def forward(self, input_ids):  # pragma: no cover - never called
            return input_ids

    with pytest.raises(InputError) as e:
        SoftLabelKernel(Opaque(), method="topk", k=1, head_chunk_tokens=8)
    assert str(e.value) == (
        "Opaque: cannot split this model into a backbone and a linear output head "
        "(get_decoder()/base_model and get_output_embeddings() must exist); teacher_logits "
        "supports Hugging Face *ForCausalLM models"
    )


def test_unknown_logit_transform_is_detected() -> None:
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2 + 1
            return out

    model = Doubled(tiny_llama(90).config).eval()
    kernel = SoftLabelKernel(model, method="topk", k=3, head_chunk_tokens=8)
    with pytest.raises(InputError) as e:
        check_split(model, kernel)
    assert str(e.value).startswith("Doubled: backbone + output head do not reproduce the model's")
    assert str(e.value).endswith(
        "this architecture transforms its logits in a way teacher_logits does not support"
    )


def test_a_teacher_with_non_finite_logits_fails_the_split_check() -> None:
    """NaN in the output head (broken weights) is named as such by the probe, not reported as
    an unknown logit transform."""
    model = tiny_llama(100)
    with torch.no_grad():
        model.lm_head.weight[3] = math.nan
    kernel = SoftLabelKernel(model, method="sample", k=4, head_chunk_tokens=8)
    with pytest.raises(InputError) as e:
        check_split(model, kernel)
    assert str(e.value) == (
        "LlamaForCausalLM: the teacher's logits are not finite (NaN or infinite) on a probe of 8 "
        "tokens; check the teacher's weights, or run it in float32 (teacher_logits.dtype) if "
        "half precision overflows"
    )


@pytest.mark.parametrize("k", [0, 91])
def test_kernel_refuses_k_outside_vocabulary(k: int) -> None:
    with pytest.raises(ConfigError) as e:
        SoftLabelKernel(tiny_llama(90), method="sample", k=k, head_chunk_tokens=8)
    assert str(e.value) == (
        f"teacher_logits.k: must be between 1 and the teacher's vocabulary size 90, got {k}"
    )


def test_fidelity_sums_per_language_and_overall() -> None:
    per_seq = np.array([[1.0, 2.0, 0.5], [3.0, 4.0, 1.5], [2.0, 2.0, 2.0]])  # (n, 3)
    a = Fidelity()
    a.add(["de", "en"], np.array([1, 0, 1]), per_seq, seq_len=4)
    b = Fidelity()
    b.add(["en"], np.array([0]), per_seq[:1], seq_len=4)
    a.merge(b)
    rep = a.report()
    assert rep["per_language"]["de"] == {
        "tokens": 4,
        "covered_mass": 0.75,
        "entropy": 1.0,
        "top1_prob": 0.375,
    }
    assert rep["per_language"]["en"]["tokens"] == 12  # rows 0 and 2, then b's row
    assert rep["overall"]["tokens"] == 16
    assert rep["overall"]["covered_mass"] == pytest.approx((1 + 3 + 2 + 1) / 16)
    stats = per_sequence_stats(*(np.ones((2, 3), np.float32) * v for v in (0.5, 2.0, 0.25)))
    assert stats.tolist() == [[1.5, 6.0, 0.75], [1.5, 6.0, 0.75]]
