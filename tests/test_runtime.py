"""The runtime (`blockrt.runtime.Model`) on the CPU: ONNX Runtime and PyTorch engines against the
PyTorch reference `generate`, on exported tiny artifacts."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from blockrt.errors import UserError
from blockrt.exporter.checkpoint import load_checkpoint
from blockrt.exporter.generate import generate
from blockrt.generation import GenerationConfig
from blockrt.graphs.manifest import Manifest
from blockrt.runtime import Model
from blockrt.runtime.torch_engine import stand_in

UNALIGNED = [[5, 6, 7, 8, 9]]  # 5 tokens: not a multiple of the block length
RAGGED = [[3], list(range(1, 9)), list(range(20, 33))]  # 1, 8 and 13 tokens in one batch
GREEDY_128 = GenerationConfig(max_new_tokens=128, ignore_eos=True)
SAMPLED = GenerationConfig(max_new_tokens=40, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)


def reference_model(artifact):
    manifest = Manifest.load(artifact)
    return load_checkpoint(artifact / "weights.safetensors", config=manifest.model_config).eval()


def reference_tokens(artifact, prompts, config):
    return generate(reference_model(artifact), prompts, config).tokens


@pytest.mark.parametrize("backend,cache_io", [("onnxruntime", "inplace"), ("onnxruntime", "concat"), ("torch", "inplace")])
@pytest.mark.parametrize("preset", ["tiny_block", "tiny_vanilla"])
def test_greedy_tokens_equal_the_reference_for_128_tokens_alone_and_in_ragged_batches(exported, preset, backend, cache_io):
    artifact = exported(preset, cache_io)
    model = Model.load(artifact, backend=backend)
    for prompts in (UNALIGNED, RAGGED):
        got = [r.token_ids for r in model.generate(prompts, GREEDY_128)]
        assert got == reference_tokens(artifact, prompts, GREEDY_128)
        assert all(len(t) == 128 for t in got)


def test_wide_block_model_with_different_widths_matches_the_reference(exported):
    artifact = exported("tiny_block_wide")
    got = [r.token_ids for r in Model.load(artifact, backend="onnxruntime").generate(RAGGED, GREEDY_128)]
    assert got == reference_tokens(artifact, RAGGED, GREEDY_128)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_seeded_sampling_is_reproducible_and_equals_the_reference_draws(exported, backend):
    artifact = exported("tiny_block")
    model = Model.load(artifact, backend=backend)
    first = [r.token_ids for r in model.generate(RAGGED, SAMPLED)]
    again = [r.token_ids for r in model.generate(RAGGED, SAMPLED)]
    other = [r.token_ids for r in model.generate(RAGGED, GenerationConfig(**{**SAMPLED.__dict__, "seed": 8}))]
    assert first == again
    assert first != other
    assert first == reference_tokens(artifact, RAGGED, SAMPLED)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_seeded_prompt_samples_the_same_tokens_alone_and_at_position_3_of_a_batch(exported, backend):
    artifact = exported("tiny_block")
    model = Model.load(artifact, backend=backend)
    prompt, others = [7, 8, 9, 10, 11], [[1, 2], list(range(30, 43)), [5]]
    alone = model.generate([prompt], SAMPLED)[0].token_ids
    batched = model.generate(others + [prompt], SAMPLED)  # position 3, among prompts of other lengths
    assert batched[3].token_ids == alone
    assert alone == reference_tokens(artifact, others + [prompt], SAMPLED)[3]  # the reference follows the rule too
    assert alone != model.generate([prompt], GenerationConfig(**{**SAMPLED.__dict__, "seed": 8}))[0].token_ids


def test_one_config_per_prompt_gives_each_prompt_its_own_seed(exported):
    model = Model.load(exported("tiny_block"), backend="onnxruntime")
    prompt = [7, 8, 9]
    configs = [GenerationConfig(**{**SAMPLED.__dict__, "seed": s}) for s in (1, 2, 1)]
    got = [r.token_ids for r in model.generate([prompt] * 3, configs)]
    assert got[0] == got[2] != got[1]
    assert got[1] == model.generate([prompt], configs[1])[0].token_ids
    with pytest.raises(UserError, match="one per prompt"):
        model.generate([prompt] * 3, configs[:2])


@pytest.mark.parametrize("preset", ["tiny_block", "tiny_vanilla"])
def test_stream_yields_exactly_the_tokens_of_generate(exported, preset):
    model = Model.load(exported(preset), backend="onnxruntime")
    config = GenerationConfig(max_new_tokens=37, ignore_eos=True)
    expected = [r.token_ids for r in model.generate(RAGGED, config)]
    streamed = [[] for _ in RAGGED]
    finished = []
    for chunk in model.stream(RAGGED, config):
        assert chunk.token_ids or chunk.finished
        streamed[chunk.index] += chunk.token_ids
        if chunk.finished:
            finished.append(chunk.index)
    assert streamed == expected
    assert sorted(finished) == [0, 1, 2]



def test_generation_keeps_the_collector_off_the_heap_it_started_with_and_gives_it_back(exported):
    """generate/stream run with automatic collection off and the objects that existed before them
    frozen (gc.freeze), so no full collection during generation walks the model; afterwards the
    collector and the heap are as before; a heap frozen (or a collector disabled) by someone else
    (a server's engine process) stays so."""
    import gc

    from blockrt.runtime.generator import INTERPRETER_FROZEN  # CPython 3.12 starts with 375 frozen objects

    model = Model.load(exported("tiny_block"), backend="torch")
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    assert gc.get_freeze_count() <= INTERPRETER_FROZEN
    during = [(gc.get_freeze_count(), gc.isenabled()) for _ in model.stream(RAGGED, config)]
    assert during and all(frozen > INTERPRETER_FROZEN and not enabled for frozen, enabled in during)
    assert gc.get_freeze_count() <= INTERPRETER_FROZEN and gc.isenabled()
    # submission (a request per prompt) and the results (a token list each) allocate per request
    # too: an unfrozen full collection there walked the whole heap (4 x ~170 ms on an H200 run)
    frozen = {}

    def recording(name, fn):  # fn, noting the frozen objects' count at its first call
        def call(*args):
            frozen.setdefault(name, gc.get_freeze_count())
            return fn(*args)
        return call

    gen = model.generator()
    gen.add, model._result = recording("add", gen.add), recording("result", model._result)
    try:
        model.generate(RAGGED, config)
    finally:
        del gen.add, model._result
    assert frozen["add"] > INTERPRETER_FROZEN and frozen["result"] > INTERPRETER_FROZEN
    assert gc.get_freeze_count() <= INTERPRETER_FROZEN
    # what generation made and returns is not left to the young generation, whose collection (at
    # the caller's next allocations) would walk every token list
    results = model.generate(RAGGED, config)
    young = {id(o) for o in gc.get_objects(generation=0)}
    assert not any(id(r) in young or id(r.token_ids) in young for r in results)
    gc.freeze()
    try:
        model.generate(RAGGED, config)
        assert gc.get_freeze_count() > INTERPRETER_FROZEN  # not unfrozen (objects freed meanwhile leave the count)
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        model.generate(RAGGED, config)
        assert not gc.isenabled()
    finally:
        gc.enable()

def test_more_prompts_than_rows_queue_and_each_gets_its_own_tokens(exported):
    artifact = exported("tiny_block")
    model = Model.load(artifact, backend="torch", max_batch=2)
    prompts = [[i + 1] * (i % 6 + 1) for i in range(7)]
    config = GenerationConfig(max_new_tokens=24 + 0, ignore_eos=True)
    assert [r.token_ids for r in model.generate(prompts, config)] == reference_tokens(artifact, prompts, config)


def test_a_traced_generator_records_each_step_admissions_prefills_and_compaction(exported):
    model = Model.load(exported("tiny_block"), backend="torch", max_batch=2)
    gen = model.generator()
    gen.trace = collections.deque()
    lengths = [8, 16, 8]  # row 0 ends first, row 1 moves into its hole and the third joins as row 1, which
    # outlives the second prompt (it joined two rounds later): it moves into row 0 in turn
    for n in lengths:
        gen.add([5, 6, 7], GenerationConfig(max_new_tokens=n, ignore_eos=True))
    steps = 0
    while gen.has_work:
        gen.step()
        steps += 1
    trace = list(gen.trace)
    assert len(trace) == steps
    assert [t.joined for t in trace if t.joined] == [2, 1] and sum(t.prefills for t in trace) == 2
    assert max(t.rows for t in trace) == 2 and trace[-1].rows <= 1
    assert [t.moved for t in trace if t.moved] == [1, 1]
    assert all(t.start <= t.launched <= t.end and t.waited == 0 for t in trace)  # CPU: nothing to wait for
    assert all(a.end <= b.start for a, b in zip(trace, trace[1:]))


def test_a_shape_without_a_graph_stands_in_on_the_cheapest_larger_graph_of_the_same_cache():
    def key(rows, attend, address=1000, width=4):
        return ((torch.Size([rows, width]), torch.Size([rows])), attend, address)

    captured = [key(64, 32), key(128, 16), key(256, 16), key(128, None), key(512, 64, address=2000),
                key(1024, 64, width=8)]
    assert stand_in(key(100, 16), captured) == key(128, 16)  # 128 x 16 rows beats 64 (too few rows) and 256 x 16
    assert stand_in(key(100, 20), captured) == key(128, None)  # attending to more rows than asked is fine
    assert stand_in(key(64, 16), captured) == key(64, 32)
    assert stand_in(key(100, None), captured) == key(128, None)  # all rows: only a graph over all rows will do
    assert stand_in(key(300, 16), captured) is None  # no graph has that many rows of this cache and width
    mixed = ((torch.Size([8, 4]), torch.Size([16])), 16, 1000)  # inputs of different batch sizes: never padded
    assert stand_in(mixed, captured) is None


def test_prefills_start_while_later_prompts_are_checked_and_a_late_bad_prompt_undoes_them(exported):
    artifact = exported("tiny_block")
    model = Model.load(artifact, backend="torch", max_batch=4)
    gen = model.generator()
    gen.prefill_budget = 4  # prompt blocks per prefill group: two of these prompts
    rows_seen, add = [], gen.add
    gen.add = lambda prompt, config: (rows_seen.append(gen.running), add(prompt, config))[1]
    prompts = [list(range(1 + i, 9 + i)) for i in range(4)]  # 2 blocks each
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    expected = reference_tokens(artifact, prompts, config)
    for _ in range(2):  # the second call first frees the rows the first one finished
        rows_seen.clear()
        assert [r.token_ids for r in model.generate(prompts, config)] == expected
        assert rows_seen == [0, 0, 2, 2]  # the first pair was prefilled before the second pair was checked
    with pytest.raises(UserError, match="prompt 2: .*outside the vocabulary"):
        model.generate(prompts[:2] + [[1, 512]], config)
    assert not gen.has_work and gen.rows == []
    assert [r.token_ids for r in model.generate(prompts, config)] == expected


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_sequences_that_stop_early_leave_the_batch_without_disturbing_the_others(exported, backend):
    artifact = exported("tiny_block")
    free = reference_tokens(artifact, RAGGED, GenerationConfig(max_new_tokens=30, ignore_eos=True))
    stop = free[1][5]  # the second prompt stops at its 6th token; the others run on (or stop where they meet it)
    config = GenerationConfig(max_new_tokens=30, stop_token_ids=[stop], ignore_eos=True)
    results = Model.load(artifact, backend=backend).generate(RAGGED, config)
    expected = reference_tokens(artifact, RAGGED, config)
    assert [r.token_ids for r in results] == expected
    assert results[1].finish_reason == "stop" and results[1].token_ids[-1] == stop
    assert len(results[1].token_ids) <= 6


def test_max_new_tokens_that_is_not_a_multiple_of_the_block_length_is_exact(exported):
    model = Model.load(exported("tiny_block"), backend="onnxruntime")
    for n in (1, 2, 5, 7):
        out = model.generate(RAGGED, GenerationConfig(max_new_tokens=n, ignore_eos=True))
        assert [len(r.token_ids) for r in out] == [n] * len(RAGGED)
        assert all(r.finish_reason == "length" for r in out)


@pytest.mark.parametrize("prompts,config,message", [
    ([[]], GenerationConfig(), "empty prompt"),
    ([[1, 2, 512]], GenerationConfig(), "outside the vocabulary"),
    ([[1, -1]], GenerationConfig(), "outside the vocabulary"),
    ([[1, 2.5]], GenerationConfig(), "a prompt must be a flat list of integer token ids"),
    ([list(range(1, 150))], GenerationConfig(max_new_tokens=32), "exceeds the max context of 160 tokens"),
    ([[1, 2]], GenerationConfig(temperature=-1.0), "temperature must be >= 0"),
    ([[1, 2]], GenerationConfig(top_p=0.0), "top_p must be in (0, 1]"),
    ([[1, 2]], GenerationConfig(top_k=-3), "top_k must be an integer >= 0"),
    ([[1, 2]], GenerationConfig(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    ([[1, 2]], GenerationConfig(stop_token_ids=[9999]), "outside the vocabulary"),
    ([], GenerationConfig(), "no prompts given"),
])
def test_bad_input_is_a_clear_error_and_the_model_stays_usable(exported, prompts, config, message):
    artifact = exported("tiny_block")
    model = Model.load(artifact, backend="onnxruntime")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.generate([[4, 5, 6]] + prompts if prompts else prompts, config)
    good = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in model.generate(RAGGED, good)] == reference_tokens(artifact, RAGGED, good)


def test_batch_above_the_artifact_limit_is_refused_with_how_to_fix(exported):
    with pytest.raises(UserError, match="above the artifact's limit of 4.*--max-batch 5"):
        Model.load(exported("tiny_block"), backend="onnxruntime", max_batch=5)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        Model.load(".", backend="tensorflow")


def test_tensorrt_backend_without_engines_says_how_to_build_them(exported):
    with pytest.raises(UserError, match="blockrt build"):
        Model.load(exported("tiny_block"), backend="tensorrt")


def test_tensorrt_engines_run_on_a_gpu(exported, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need an NVIDIA GPU; none is present here (engine builds are tested in test_build.py)")
    pytest.importorskip("tensorrt", reason="full TensorRT is not installed (pip install 'blockrt[trt]')")
    from blockrt.runtime.build import build_engines

    artifact = tmp_path / "a"
    import shutil

    shutil.copytree(exported("tiny_block"), artifact)
    build_engines(artifact, backend="tensorrt")
    got = [r.token_ids for r in Model.load(artifact, backend="tensorrt").generate(RAGGED, GREEDY_128)]
    assert got == reference_tokens(artifact, RAGGED, GREEDY_128)


def test_cli_run_prints_json_equal_to_the_reference(exported, blockrt_cli):
    artifact = exported("tiny_vanilla")
    code, out, err = blockrt_cli("run", str(artifact), "--prompt-ids", "1,2,3", "--prompt-ids", "9",
                                 "--max-new-tokens", "20", "--ignore-eos", "--json")
    assert code == 0, err
    rows = json.loads(out)
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    assert [r["token_ids"] for r in rows] == reference_tokens(artifact, [[1, 2, 3], [9]], config)
    assert [r["finish_reason"] for r in rows] == ["length", "length"]


def test_cli_run_streams_tokens_and_reads_a_jsonl_prompts_file(exported, blockrt_cli, tmp_path):
    artifact = exported("tiny_block")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('[1, 2, 3]\n{"prompt_ids": [7, 8]}\n')
    code, out, err = blockrt_cli("run", str(artifact), "--prompts-file", str(prompts), "--max-new-tokens", "8",
                                 "--ignore-eos", "--backend", "torch")
    assert code == 0, err
    expected = reference_tokens(artifact, [[1, 2, 3], [7, 8]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    for i, tokens in enumerate(expected):
        streamed = [int(t) for line in out.splitlines() if line.startswith(f"[{i}] ")
                    for t in line.split()[1:] if t.isdigit()]
        assert streamed == tokens


def test_cli_run_bad_prompt_ids_exit_2_with_the_flag_named(exported, blockrt_cli):
    code, _, err = blockrt_cli("run", str(exported("tiny_block")), "--prompt-ids", "1,x")
    assert code == 2
    assert "--prompt-ids" in err and "'x' is not an integer" in err


@pytest.mark.parametrize("preset", ["tiny_block", "tiny_vanilla"])
def test_bf16_torch_engine_tokens_are_top_choices_of_the_fp32_reference(preset):
    from bf16_check import assert_bf16_tokens_are_reference_top_choices

    assert_bf16_tokens_are_reference_top_choices(preset, "cpu")


# ------------------------------------------------------------------------- library, not CLI logic

def test_auto_backend_picks_onnxruntime_without_a_gpu_and_says_so(exported, blockrt_cli, caplog):
    if torch.cuda.is_available():
        pytest.skip("with a GPU, auto picks tensorrt or torch")
    artifact = exported("tiny_block")
    assert Model.load(artifact, backend="auto").backend == "onnxruntime"
    caplog.set_level("INFO", logger="blockrt.run")
    code, out, err = blockrt_cli("run", str(artifact), "--backend", "auto", "--prompt-ids", "4,5,6",
                                 "--max-new-tokens", "9", "--ignore-eos", "--json")
    assert code == 0, err
    config = GenerationConfig(max_new_tokens=9, ignore_eos=True)
    assert [r["token_ids"] for r in json.loads(out)] == reference_tokens(artifact, [[4, 5, 6]], config)
    assert "on onnxruntime (cpu)" in caplog.text


@pytest.fixture(scope="module")
def tokenized_artifact(tmp_path_factory, bpe_tokenizer_file):
    from blockrt.exporter.export import export

    artifact = tmp_path_factory.mktemp("tokenized") / "tiny_block"
    export("tiny_block", artifact, max_batch=2, max_context=64, tokenizer=bpe_tokenizer_file)
    return artifact


def test_an_artifact_tokenizer_encodes_text_prompts_and_decodes_the_output(tokenized_artifact, bpe_tokenizer_file):
    from tokenizers import Tokenizer

    model = Model.load(tokenized_artifact, backend="onnxruntime")
    tok = Tokenizer.from_file(str(bpe_tokenizer_file))
    text = "the cat sat on the mat"
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    result = model.generate(text, config)[0]
    assert result.prompt_ids == tok.encode(text).ids and len(result.prompt_ids) > 1
    assert result.token_ids == model.generate([tok.encode(text).ids], config)[0].token_ids
    assert result.text == tok.decode(result.token_ids)


def test_an_artifact_whose_tokenizer_json_is_broken_is_a_user_error_naming_the_file(tokenized_artifact, tmp_path):
    import shutil

    artifact = tmp_path / "broken"
    shutil.copytree(tokenized_artifact, artifact)
    (artifact / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(UserError, match=r"the artifact's tokenizer .*tokenizer.json: not a readable"):
        Model.load(artifact, backend="onnxruntime", verify_files=False)


def test_from_torch_leaves_the_callers_model_unchanged_and_shares_matching_tensors():
    from blockrt.exporter import build_model, get_preset, init_random
    from blockrt.exporter.model import Attention

    model = init_random(build_model(get_preset("tiny_block")), seed=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bf16 = Model.from_torch(model, dtype="bf16", max_batch=2, max_context=32, device="cpu")
    fp32 = Model.from_torch(model, dtype="fp32", max_batch=2, max_context=32, device="cpu")
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())
    assert not any(m.decode_math for m in model.modules() if isinstance(m, Attention))
    engine_tensors = {t.data_ptr() for t in fp32.engines["block_decoder"].step.model.state_dict().values()}
    assert {t.data_ptr() for t in after.values()} == engine_tensors  # fp32 on CPU: no copy
    prompts = [[1, 2, 3], [4, 5]]
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    assert [r.token_ids for r in fp32.generate(prompts, config)] == generate(model, prompts, config).tokens
    assert all(len(r.token_ids) == 8 for r in bf16.generate(prompts, config))


def test_cli_turns_user_errors_into_exit_2_but_lets_other_value_errors_through(blockrt_cli, monkeypatch):
    from blockrt.exporter import presets

    def broken(name):
        raise ValueError("an internal bug, not bad input")

    monkeypatch.setattr(presets, "preset_summary", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        blockrt_cli("presets")
    code, _, err = blockrt_cli("generate", "--preset", "nope", "--prompt-ids", "1")
    assert code == 2 and err.startswith("Error: unknown preset 'nope'")


def test_capturing_graphs_at_start_is_a_no_op_without_cuda_graphs_and_refuses_live_rows(exported):
    model = Model.load(exported("tiny_block"), backend="torch")
    gen = model.generator()
    assert gen.capture_graphs() == 0  # a CPU engine captures no graph (tests/test_gpu.py checks CUDA)
    gen.add([1, 2, 3], GenerationConfig(max_new_tokens=8))
    gen.step()
    with pytest.raises(RuntimeError, match="no live rows"):
        gen.capture_graphs()
    gen.reset()


def test_trace_names_where_a_slow_garbage_collection_ran(exported):
    """A collection longer than SLOW_COLLECTION_S is recorded with the stack that triggered it, so a
    bench run can say who walked the heap (and step_summary keeps those of its window)."""
    import gc
    import time

    from blockrt.runtime.tracing import SLOW_COLLECTION_S, Trace, step_summary

    gen = Model.load(exported("tiny_block"), backend="torch").generator()
    heap = [[i] for i in range(1_500_000)]  # enough tracked objects for a slow full collection
    trace = Trace(gen)
    start = time.perf_counter()
    try:
        gc.collect()
    finally:
        recorded = trace.stop()
    del heap
    slow = step_summary(recorded, start, time.perf_counter(), batch=1)["gc_slow_stacks"]
    durations = [b - a for a, b, _ in recorded["gc"]]
    assert max(durations) > SLOW_COLLECTION_S and len(slow) == sum(d > SLOW_COLLECTION_S for d in durations)
    assert "test_trace_names_where_a_slow_garbage_collection_ran" in slow[0]
