"""The layer-by-layer calibration engine: the statistics it hands a compressor are the ones a full forward pass of
the (compressed) model gives, the groups follow the data flow, and offloading to disk keeps one block resident."""
import pytest
import torch

from gptopt_core.kit.calibration import LayerStats, find_blocks, resident_param_bytes, run_blockwise, split_by_block
from gptopt_core.kit.models import tiny_model
from gptopt_core.kit.modules import weight_modules


def batches(n=3, b=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (b, t), generator=g) for _ in range(n)]


def full_forward_stats(model, names, data):
    """Hessians and squared norms of each layer's inputs from plain forward passes of the whole model."""
    modules = dict(model.named_modules())
    stats = {n: LayerStats(n, modules[n]) for n in names}
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: stats[n].add(i[0], ("hessian", "sq_norms"))) for n in names]
    with torch.no_grad():
        for b in data:
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    return {n: s.finish() for n, s in stats.items()}


def halve(seen):
    """A compressor that records what it was given and halves the layers' weights (changes every output)."""
    def compress(block, stats):
        for name, st in stats.items():
            seen[name] = (block.index, st.hessian.clone(), st.sq_norms, st.samples)
            st.module.weight.data.mul_(0.5)
    return compress


@pytest.mark.parametrize("name", ["tiny-random-gpt2", "tiny-random-llama"])
def test_stats_equal_a_full_forward_of_the_compressed_model(name):
    """Sequential: each group calibrates on the model with everything before it compressed, which is exactly what a
    full forward pass of the final model feeds that layer (its own and later compressions cannot reach its input).
    Covers the capture of the first block's inputs (attention mask, Llama's position embeddings), the propagation of
    compressed outputs and Conv1D's transposed weights."""
    model, _ = tiny_model(name)
    model.eval()
    data = batches()
    seen = {}
    report = run_blockwise(model, data, halve(seen), stats=("hessian", "sq_norms"))
    names = [n for n, _ in weight_modules(model)]
    assert set(seen) == set(names) and report["layers"] == len(names) and report["groups"] == 8
    ref = full_forward_stats(model, names, data)
    for n in names:
        index, hessian, sq, samples = seen[n]
        assert samples == ref[n].samples == 3 * 2 * 24
        torch.testing.assert_close(hessian, ref[n].hessian, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sq, ref[n].sq_norms, rtol=1e-4, atol=1e-5)
        assert n.startswith(f"{find_blocks(model)[0]}.{index}.")


def test_layers_reading_one_input_share_one_hessian():
    """Llama's q/k/v (and gate/up) read the same tensor: their statistics are computed once and shared."""
    model, _ = tiny_model("tiny-random-llama")
    ids = {}

    def record(block, stats):
        for name, st in stats.items():
            if block.index == 0:
                ids[name.split(".", 3)[-1]] = (id(st.hessian), st.samples)

    run_blockwise(model, batches(), record, sequential=False)
    one = {ids[n] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    assert len(one) == 1 and ids["mlp.gate_proj"] == ids["mlp.up_proj"]
    assert len({ids[n] for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}) == 4


@pytest.mark.parametrize("name,groups", [
    ("tiny-random-llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                           ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("tiny-random-gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
])
def test_sequential_groups_follow_the_data_flow(name, groups):
    model, _ = tiny_model(name)
    prefix, _ = find_blocks(model)
    calls = []
    run_blockwise(model, batches(1), lambda block, stats: calls.append((block.index, sorted(stats))),
                  sequential=True)
    expected = [(i, sorted(f"{prefix}.{i}.{n}" for n in g)) for i in range(2) for g in groups]
    assert calls == expected
    calls.clear()
    run_blockwise(model, batches(1), lambda block, stats: calls.append(block.index), sequential=False)
    assert calls == [0, 1]


@pytest.mark.parametrize("name", ["tiny-random-gpt2", "tiny-random-llama"])
def test_disk_offload_keeps_one_block_resident_and_changes_nothing(name, tmp_path):
    model, _ = tiny_model(name)
    ref_model, _ = tiny_model(name)
    _, blocks = find_blocks(model)
    dense = resident_param_bytes(model)
    block_bytes = resident_param_bytes(blocks[0])
    outside = dense - sum(resident_param_bytes(b) for b in blocks)
    during = []

    def compress(block, stats):
        resident = [i for i, b in enumerate(blocks) if all(p.device.type != "meta" for p in b.parameters())]
        offloaded = [i for i, b in enumerate(blocks) if all(p.device.type == "meta" for p in b.parameters())]
        during.append((block.index, resident, offloaded, resident_param_bytes(model)))
        for st in stats.values():
            st.module.weight.data.mul_(0.5)

    data = batches()
    report = run_blockwise(model, data, compress, offload="disk", offload_dir=str(tmp_path))
    run_blockwise(ref_model, data, halve({}), offload="none")
    assert during and all(resident == [i] and offloaded == [j for j in range(len(blocks)) if j != i]
                          for i, resident, offloaded, _ in during)
    assert max(b for *_, b in during) == outside + block_bytes == report["peak_resident_param_bytes"] < dense
    assert list(tmp_path.iterdir()) == []  # the temporary block files are gone
    # the model is whole again and equals the same compression without offloading
    assert resident_param_bytes(model) == dense
    for (n, p), (_, q) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(p, q), n
    with torch.no_grad():
        ids = data[0]
        torch.testing.assert_close(model(input_ids=ids).logits, ref_model(input_ids=ids).logits)


def test_cpu_offload_equals_no_offload():
    model, _ = tiny_model("tiny-random-llama")
    ref, _ = tiny_model("tiny-random-llama")
    seen, seen_ref = {}, {}
    run_blockwise(model, batches(), halve(seen), offload="cpu", device="cpu")
    run_blockwise(ref, batches(), halve(seen_ref))
    for n in seen:
        torch.testing.assert_close(seen[n][1], seen_ref[n][1])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_bad_arguments():
    model, _ = tiny_model("tiny-random-gpt2")
    with pytest.raises(ValueError, match="offload must be one of"):
        run_blockwise(model, batches(1), lambda b, s: None, offload="tape")
    with pytest.raises(ValueError, match="unknown statistic"):
        run_blockwise(model, batches(1), lambda b, s: None, stats=("curvature",))


@pytest.mark.parametrize("name", ["tiny-random-gpt2", "tiny-random-llama"])
def test_find_blocks_finds_the_one_block_of_a_one_block_model(name):
    from transformers import AutoModelForCausalLM

    model, _ = tiny_model(name)
    config = model.config
    config.num_hidden_layers = 1  # GPT-2's n_layer is the same attribute
    one = AutoModelForCausalLM.from_config(config)
    prefix, blocks = find_blocks(one)
    assert prefix == {"tiny-random-gpt2": "transformer.h", "tiny-random-llama": "model.layers"}[name]
    assert len(blocks) == 1
    assert set(split_by_block(one, [n for n, _ in weight_modules(one)])[0]) == {0}
