"""alphaq.model.weights: HF and GGUF sources give the matrices llama.cpp's converter writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alphaq.spectral.analyze import analyze_model
from alphaq.errors import AlphaQError
from alphaq.model.weights import ggml_n_dims, llama_quantizes, open_model, unpermute_qk

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> Path:
    p = FIXTURES / name
    if not (p / "config.json").exists():
        pytest.fail(f"fixture {p} is missing (scripts/train_tiny_moe.py --zoo fixtures)")
    return p


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def same_matrices(a, b) -> None:
    ma, mb = a.matrices(), b.matrices()
    assert [(m.tensor, m.expert, m.kind, m.rows, m.cols) for m in ma] == [
        (m.tensor, m.expert, m.kind, m.rows, m.cols) for m in mb
    ]
    for x, y in zip(ma, mb):
        np.testing.assert_array_equal(x.load(), y.load(), err_msg=x.label)


# --------------------------------------------------------------------------------------
# against llama.cpp's own converter
# --------------------------------------------------------------------------------------


# mixtral: Q/K rows permuted by LlamaModel; deepseek2: kv_b_proj split into attn_k_b/attn_v_b
@pytest.mark.parametrize("name", ["mixtral", "deepseek2"])
def test_hf_and_converted_gguf_give_identical_matrices_and_alpha(name, float_ggufs):
    hf_dir = fixture(name)
    gguf_path = float_ggufs[name]  # written by llama.cpp's converter (conftest)
    with open_model(hf_dir) as hf, open_model(gguf_path) as gg:
        assert (hf.source, gg.source) == ("hf", "gguf")
        assert hf.arch == gg.arch and hf.n_blocks == gg.n_blocks
        same_matrices(hf, gg)
    a = analyze_model(hf_dir, use_cache=False, progress=False)
    b = analyze_model(gguf_path, use_cache=False, progress=False)
    assert [s.tensor for s in a] == [s.tensor for s in b]
    assert [s.alpha for s in a] == [s.alpha for s in b]  # same bits in, same alpha out


# --------------------------------------------------------------------------------------
# HF naming and layouts
# --------------------------------------------------------------------------------------


def test_mixtral_per_expert_names_map_to_merged_gguf_tensor():
    path = fixture("mixtral")
    raw = hf_tensors(path)
    with open_model(path) as mw:
        assert mw.arch == "llama" and mw.source == "hf"
        by_key = {(m.tensor, m.expert): m for m in mw.matrices()}
        m = by_key[("blk.1.ffn_gate_exps.weight", 2)]
        assert (m.block, m.kind) == (1, "ffn_gate_exps")
        want = raw["model.layers.1.block_sparse_moe.experts.2.w1.weight"].float().numpy()
        np.testing.assert_array_equal(m.load(), want)
        assert by_key[("blk.0.ffn_down_exps.weight", 7)].load().shape == tuple(
            raw["model.layers.0.block_sparse_moe.experts.7.w2.weight"].shape
        )
        kinds = {m.kind for m in mw.matrices()}
    assert kinds == {"token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output",
                     "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}  # no router, no norms
    order = [m.kind for m in open_model(path).matrices()]
    assert order[0] == "token_embd" and order[-1] == "output"


def test_fused_expert_tensors_equal_per_expert_ones(tmp_path):
    """transformers-5 fused (n_expert, 2*n_ff, n_embd) gate_up_proj and (n_expert, n_embd, n_ff)
    down_proj are sliced like conversion/qwen.py splits them."""
    src = fixture("qwen3moe")
    raw = hf_tensors(src)
    cfg = json.loads((src / "config.json").read_text())
    fused = {}
    for k, v in raw.items():
        if ".mlp.experts." not in k:
            fused[k] = v
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        E = len([k for k in raw if k.startswith(f"{p}.") and k.endswith(".gate_proj.weight")])
        gate = torch.stack([raw[f"{p}.{e}.gate_proj.weight"] for e in range(E)])
        up = torch.stack([raw[f"{p}.{e}.up_proj.weight"] for e in range(E)])
        fused[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        fused[f"{p}.down_proj"] = torch.stack([raw[f"{p}.{e}.down_proj.weight"] for e in range(E)])
    out = tmp_path / "fused"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    save_file(fused, out / "model.safetensors")
    with open_model(src) as a, open_model(out) as b:
        same_matrices(a, b)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    src = fixture("qwen2moe")
    raw = hf_tensors(src)
    names = sorted(raw)
    half = len(names) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    shutil.copy(src / "router_init.safetensors", out / "router_init.safetensors")  # not weights
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: raw[k] for k in part}, out / shard)
        weight_map.update({k: shard for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_model(src) as a, open_model(out) as b:
        same_matrices(a, b)


def test_llama_quantizes_mirrors_llama_quant_rules():
    assert llama_quantizes("blk.0.ffn_down_exps.weight", 3)
    assert llama_quantizes("blk.0.attn_q.weight", 2)
    assert llama_quantizes("token_embd.weight", 2) and llama_quantizes("output.weight", 2)
    assert not llama_quantizes("blk.0.ffn_gate_inp.weight", 2)  # router
    assert not llama_quantizes("blk.0.attn_norm.weight", 2)
    assert not llama_quantizes("blk.0.attn_q.bias", 2)
    assert not llama_quantizes("blk.0.attn_q.weight", 1)
    # Qwen2-MoE shared_expert_gate is (1, n_embd): ggml_n_dims 1, so never quantised
    assert ggml_n_dims((1, 2048)) == 1 and ggml_n_dims((8, 1, 64)) == 3
    assert not llama_quantizes("blk.0.ffn_gate_inp_shexp.weight", ggml_n_dims((1, 2048)))


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    # verbatim logic of conversion/llama.py LlamaModel.permute (llama-cpp-python 0.3.36)
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (32, 8)])
def test_unpermute_inverts_llama_cpp_permute(heads):
    n_head, n_kv = heads
    rng = np.random.default_rng(0)
    head_dim = 16
    w = rng.standard_normal((n_kv * head_dim, 48)).astype(np.float32)
    p = llama_cpp_permute(w, n_head, n_kv)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, n_kv), w)


# --------------------------------------------------------------------------------------
# GGUF input written with gguf-py
# --------------------------------------------------------------------------------------


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, QT]], arch: str = "qwen3moe", blocks: int = 1):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(blocks)
    w.add_head_count(2)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16])
def test_gguf_float_types_and_expert_slices(qtype, tmp_path):
    rng = np.random.default_rng(1)
    exps = rng.standard_normal((4, 96, 64)).astype(np.float32)  # (n_expert, rows, cols)
    attn = rng.standard_normal((64, 64)).astype(np.float32)
    norm = np.ones(64, np.float32)
    path = write_gguf(tmp_path / "m.gguf", {
        "blk.0.ffn_up_exps.weight": (exps, qtype),
        "blk.0.attn_q.weight": (attn, qtype),
        "blk.0.attn_norm.weight": (norm, QT.F32),
    })
    # what the file holds, decoded by gguf-py itself
    want_exps = gguf.quants.dequantize(gguf.quants.quantize(exps, qtype), qtype)
    want_attn = gguf.quants.dequantize(gguf.quants.quantize(attn, qtype), qtype)
    with open_model(path) as mw:
        mats = mw.matrices()
        assert [(m.tensor, m.expert) for m in mats] == [("blk.0.attn_q.weight", None)] + [
            ("blk.0.ffn_up_exps.weight", e) for e in range(4)
        ]
        np.testing.assert_array_equal(mats[0].load(), want_attn)
        for e in range(4):
            assert (mats[1 + e].rows, mats[1 + e].cols) == (96, 64)
            np.testing.assert_array_equal(mats[1 + e].load(), want_exps[e])


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0])
def test_a_quantised_gguf_is_read_only_at_q8_0(qtype, tmp_path):
    """Q8_0 is read dequantised (alphaq.model.weights.REQUANTISABLE_TYPES); a lower type is refused."""
    rng = np.random.default_rng(2)
    path = write_gguf(tmp_path / "q.gguf", {
        "blk.0.attn_q.weight": (rng.standard_normal((64, 64)).astype(np.float32), QT.F32),
        "blk.0.ffn_down_exps.weight": (rng.standard_normal((2, 64, 96)).astype(np.float32), qtype),
    })
    if qtype != QT.Q8_0:
        with pytest.raises(AlphaQError, match=r"blk\.0\.ffn_down_exps\.weight is Q4_0; only F32/F16/BF16 or Q8_0"):
            open_model(path)
        return
    with open_model(path) as m:
        expert = next(x for x in m.matrices() if x.expert == 1)
        assert expert.dtype == "Q8_0" and expert.load().shape == (64, 96)


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", {"blk.0.attn_q.weight": (np.ones((4, 32), np.float32), QT.F32)}, arch="gpt2")
    with pytest.raises(AlphaQError, match="unsupported GGUF architecture 'gpt2'"):
        open_model(path)


# --------------------------------------------------------------------------------------
# bad HF input
# --------------------------------------------------------------------------------------


def test_bad_inputs(tmp_path):
    with pytest.raises(AlphaQError, match="does not exist"):
        open_model(tmp_path / "nope")
    with pytest.raises(AlphaQError, match="without config.json"):
        open_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(AlphaQError, match=r"unsupported architecture GPT2LMHeadModel; supported: .*MixtralForCausalLM"):
        open_model(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(AlphaQError, match="neither an HF checkpoint directory nor a .gguf"):
        open_model(tmp_path / "w.safetensors")
    # a dense Nemotron-H: llama.cpp's converter would write an unloadable nemotron_h_moe of it
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NemotronHForCausalLM"], "num_hidden_layers": 4,
                                                      "hybrid_override_pattern": "M-*-"}))
    with pytest.raises(AlphaQError, match="Nemotron-H without MoE blocks .* is not supported"):
        open_model(tmp_path)
    # a Solar Open with NextN layers: its converter keeps them and refuses --no-mtp
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SolarOpenForCausalLM"], "num_hidden_layers": 4,
                                                      "num_nextn_predict_layers": 1}))
    with pytest.raises(AlphaQError, match="Solar Open checkpoint with NextN .* not supported"):
        open_model(tmp_path)


# --------------------------------------------------------------------------------------
# architectures outside the zoo, random weights in their HF layout: DeepSeek-V3 (also R1, Kimi K2)
# and GLM-4.7-Flash, which llama.cpp converts as deepseek2, GLM-4.5, GLM-4.5V and Solar Open, which
# it converts as glm4moe, OLMoE, MiniMax-M2, ERNIE-4.5, dots.llm1, AFMoE, Qwen3-Next, Qwen3.5-MoE,
# Qwen3-VL-MoE, Qwen3-Omni-MoE, GLM-4.5V and Llama 4 (the last five multimodal), Granite 3.x MoE,
# Granite 4.0-H, Phi-3.5-MoE, LFM2-MoE, Jamba, EXAONE-MoE, Cohere2-MoE, Nemotron 3 Nano, DBRX,
# Hunyuan-A13B and Kimi-Linear, and the dense Llama, Qwen2 and Qwen3
# --------------------------------------------------------------------------------------


_COMMON = dict(vocab_size=1024, hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
               max_position_embeddings=512)
# DeepSeek-style: a dense first block, then 8 routed experts + 1 shared
_DEEPSEEK_MOE = dict(intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=3, n_shared_experts=1,
                     n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1)
_MLA = dict(q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32)


def _configs() -> dict:
    """kind -> its transformers config. Routers say sigmoid where the published configs do
    (MiniMax-M2, dots.llm1: llama.cpp's converter writes the gating function from it, and its
    graph aborts without one)."""
    import transformers as T

    return {
        # MLA with a query LoRA, grouped top-k routing with its score-correction bias
        "deepseek-v3": lambda: T.DeepseekV3Config(**_COMMON, **_DEEPSEEK_MOE, **_MLA, n_group=2, topk_group=1),
        "glm-4.5": lambda: T.Glm4MoeConfig(**_COMMON, **_DEEPSEEK_MOE),
        # GLM-4.5V / 4.6V: GLM-4.5's text model (biased attention) inside the multimodal class
        "glm-4.5v": lambda: T.Glm4vMoeConfig(text_config=dict(**_COMMON, **_DEEPSEEK_MOE),
                                             vision_config=dict(depth=1, hidden_size=64, num_heads=2,
                                                                intermediate_size=128, out_hidden_size=256)),
        # Solar Open: GLM-4.5's MoE without a dense block, full rotary (as its modeling says)
        "solar-open": lambda: T.SolarOpenConfig(
            **_COMMON, moe_intermediate_size=128, num_hidden_layers=3, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=2, head_dim=64,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=1.0)),
        # GLM-4.7-Flash: GLM's MoE with DeepSeek's MLA; llama.cpp converts it as deepseek2
        "glm-4.7-flash": lambda: T.Glm4MoeLiteConfig(**_COMMON, **_DEEPSEEK_MOE, **_MLA, n_group=1, topk_group=1),
        # Q/K norms, no grouped KV heads: llama.cpp's olmoe graph takes none, nor do real OLMoE checkpoints
        "olmoe": lambda: T.OlmoeConfig(**_COMMON, intermediate_size=128, num_hidden_layers=2, num_experts=8,
                                       num_experts_per_tok=2),
        "minimax-m2": lambda: T.MiniMaxM2Config(**_COMMON, intermediate_size=128, num_hidden_layers=2,
                                                num_local_experts=8, num_experts_per_tok=2, head_dim=64,
                                                rotary_dim=32, scoring_func="sigmoid", use_routing_bias=True),
        # a dense first block, 8 experts + 1 shared, tied embeddings (no output tensor)
        "ernie-4.5": lambda: T.Ernie4_5_MoeConfig(**_COMMON, intermediate_size=512, moe_intermediate_size=128,
                                                  num_hidden_layers=3, moe_num_experts=8, moe_k=2,
                                                  moe_layer_start_index=1, moe_num_shared_experts=1),
        "dots1": lambda: T.Dots1Config(**_COMMON, **_DEEPSEEK_MOE, scoring_func="sigmoid"),
        # gated attention (attn_gate), a dense first block, 8 experts + 1 shared
        "afmoe": lambda: T.AfmoeConfig(**_COMMON, intermediate_size=512, moe_intermediate_size=128,
                                       num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                       num_dense_layers=1, num_shared_experts=1, head_dim=64),
        # gated DeltaNet in 3 layers of 4 (2 value heads per key head), gated attention in the 4th
        "qwen3-next": lambda: T.Qwen3NextConfig(**_COMMON, **_QWEN_LINEAR),
        # the same text model inside the multimodal class Qwen3.5 is published as
        "qwen3.5-moe": lambda: T.Qwen3_5MoeConfig(text_config=dict(**_QWEN_LINEAR, **{**_COMMON, "vocab_size": 1040}),
                                                  vision_config=_VISION_QWEN),
        "qwen3-vl-moe": lambda: T.Qwen3VLMoeConfig(
            text_config=dict(**_COMMON, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=2,
                             num_experts=8, num_experts_per_tok=2, head_dim=64,
                             rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[12, 10, 10],
                                                  mrope_interleaved=True)),
            vision_config={**_VISION_QWEN, "deepstack_visual_indexes": []}),
        # Qwen3-Omni: the thinker's text model is Qwen3-VL-MoE's (per-expert tensors under
        # "thinker."), beside its audio and vision towers; no talker (enable_audio_output=False, as
        # the Thinking checkpoint is published)
        "qwen3-omni-moe": lambda: T.Qwen3OmniMoeConfig(
            thinker_config=dict(
                text_config=dict(**_COMMON, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=2,
                                 num_experts=8, num_experts_per_tok=2, head_dim=64,
                                 rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                      mrope_section=[12, 10, 10], mrope_interleaved=True)),
                vision_config={**_VISION_QWEN, "deepstack_visual_indexes": []},
                audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128,
                                  d_model=64, output_dim=256, downsample_hidden_size=16, max_source_positions=64)),
            enable_audio_output=False),
        # Scout's pattern: every block MoE with a shared expert; 4 blocks, as llama.cpp's chunked
        # attention wants a full-attention block in every 4
        "llama-4": lambda: T.Llama4Config(
            text_config=dict(**_COMMON, intermediate_size=64, intermediate_size_mlp=512, num_hidden_layers=4,
                             num_local_experts=8, num_experts_per_tok=1, head_dim=64, interleave_moe_layer_step=1),
            vision_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                               image_size=64, patch_size=16, vision_output_dim=128, projector_input_dim=128,
                               projector_output_dim=128)),
        # Granite 3.x MoE with a shared expert: gate and up merged in input_linear, Q/K permuted
        "granite-moe": lambda: T.GraniteMoeSharedConfig(**_COMMON, intermediate_size=128, num_hidden_layers=2,
                                                        num_local_experts=8, num_experts_per_tok=2,
                                                        shared_intermediate_size=192),
        # Granite 4.0-H: Mamba-2 in 3 blocks of 4, attention in the 4th, MoE with a shared expert
        "granite-4.0-h": lambda: T.GraniteMoeHybridConfig(
            **_COMMON, intermediate_size=128, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2,
            shared_intermediate_size=192, layer_types=["mamba", "mamba", "mamba", "attention"], mamba_n_heads=8,
            mamba_d_head=64, mamba_d_state=32, mamba_n_groups=1, mamba_expand=2),
        # Phi-3.5-MoE: biased attention and output head, LongRoPE (llama.cpp's graph wants all three)
        "phi-3.5-moe": lambda: T.PhimoeConfig(
            **{**_COMMON, "max_position_embeddings": 4096}, intermediate_size=128, num_hidden_layers=2,
            num_local_experts=8, num_experts_per_tok=2, lm_head_bias=True, attention_bias=True,
            rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 32, long_factor=[1.0] * 32,
                                 short_mscale=1.0, long_mscale=1.0, original_max_position_embeddings=512)),
        # LFM2-MoE (LFM2-8B-A1B): gated short-convolution blocks and attention blocks, dense first
        # block, then experts with a score-correction bias
        "lfm2-moe": lambda: T.Lfm2MoeConfig(
            **_COMMON, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4, num_dense_layers=1,
            num_experts=8, num_experts_per_tok=2, layer_types=["conv", "full_attention", "conv", "full_attention"]),
        # Jamba: Mamba-1 blocks with attention every 4th, experts every 2nd block
        "jamba": lambda: T.JambaConfig(
            **_COMMON, intermediate_size=128, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
            expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=3,
            mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=16, use_mamba_kernels=False),
        # EXAONE-MoE (K-EXAONE): sliding-window attention in 3 of 4 blocks, dense first block, a
        # shared expert, a sigmoid router (transformers' model; the config must say so for llama.cpp's
        # converter to write the gating function its loader requires)
        "exaone-moe": lambda: T.ExaoneMoeConfig(scoring_func="sigmoid",
            **_COMMON, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4, num_experts=8,
            num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1, sliding_window=64,
            layer_types=["sliding_attention"] * 3 + ["full_attention"], mlp_layer_types=["dense"] + ["sparse"] * 3),
        # Cohere2-MoE: sliding-window attention in 3 of 4 blocks, a tied head with a logit scale
        "cohere2-moe": lambda: T.Cohere2MoeConfig(
            **_COMMON, intermediate_size=512, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
            head_dim=64, sliding_window=64, layer_types=["sliding_attention"] * 3 + ["full_attention"],
            mlp_layer_types=["sparse"] * 4),
        # Nemotron 3 Nano: Mamba-2, MoE and attention blocks (llama.cpp's nemotron_h_moe: routed
        # experts of up and down projections only, a shared expert; Q/K permuted by the converter)
        "nemotron-3-nano": lambda: T.NemotronHConfig(
            **_COMMON, intermediate_size=256, layers_block_type=["mamba", "moe", "attention", "moe"],
            n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128,
            num_experts_per_tok=2, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=16, n_groups=2, head_dim=64),
        # DBRX: its own field names, fused QKV (clipped), experts fused in 2-D w1/v1/w2 tensors
        "dbrx": lambda: T.DbrxConfig(
            vocab_size=1024, d_model=256, n_heads=4, n_layers=2, max_seq_len=512,
            attn_config=dict(kv_n_heads=4, clip_qkv=8, rope_theta=1e4),
            ffn_config=dict(ffn_hidden_size=128, moe_num_experts=8, moe_top_k=2, ffn_act_fn={"name": "silu"})),
        # Hunyuan-A13B: per-expert tensors, a shared expert as wide as the routed ones, Q/K norms,
        # tied embeddings as published (the per-layer lists its converter wants: _random_checkpoint)
        "hunyuan-moe": lambda: T.HunYuanMoEV1Config(**_COMMON, intermediate_size=128, num_hidden_layers=2, num_experts=8,
                                                    moe_topk=2, head_dim=64, tie_word_embeddings=True),
        # Kimi-Linear: KDA (linear attention) in 3 blocks of 4, MLA without a query LoRA (as published)
        # in the 4th, a dense first block, then 8 experts + 1 shared behind a sigmoid router
        # (config.json in Moonshot's published form: _random_checkpoint)
        "kimi-linear": lambda: T.KimiLinearConfig(
            **_COMMON, **{**_MLA, "q_lora_rank": None}, bos_token_id=1, eos_token_id=2, pad_token_id=None,
            intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4, num_experts=8,
            num_experts_per_tok=2, n_shared_experts=1, linear_num_heads=4, linear_head_dim=64,
            layer_types=["linear_attention"] * 3 + ["full_attention"], mlp_layer_types=["dense"] + ["sparse"] * 3),
        # the dense architectures (llama: Q/K permuted by the converter)
        "llama": lambda: T.LlamaConfig(**_COMMON, intermediate_size=512, num_hidden_layers=2),
        "qwen2": lambda: T.Qwen2Config(**_COMMON, intermediate_size=512, num_hidden_layers=2),
        "qwen3": lambda: T.Qwen3Config(**_COMMON, intermediate_size=512, num_hidden_layers=2, head_dim=64),
    }


_QWEN_LINEAR = dict(moe_intermediate_size=128, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, head_dim=64,
                    shared_expert_intermediate_size=128)
_VISION_QWEN = dict(depth=1, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=256)
# multimodal checkpoints (their text model is what llama.cpp's converter writes to the GGUF)
_MULTIMODAL = {"qwen3.5-moe", "qwen3-vl-moe", "llama-4", "glm-4.5v"}


def _random_checkpoint(kind: str, out: Path) -> Path:
    """A random BF16 checkpoint of ``kind`` (`_configs`) as transformers saves it, with the
    DeepSeek-V2 fixture's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(0)
    auto = AutoModelForImageTextToText if kind in _MULTIMODAL else AutoModelForCausalLM
    if kind == "qwen3-omni-moe":  # no Auto class maps Qwen3-Omni's config: its own class
        from transformers import Qwen3OmniMoeForConditionalGeneration
        model = Qwen3OmniMoeForConditionalGeneration(_configs()[kind]())
    else:
        model = auto.from_config(_configs()[kind]())
    model.to(torch.bfloat16).save_pretrained(out)
    if kind == "qwen3-vl-moe":  # Qwen3-VL-MoE is published with input-major fused experts, as
        # transformers 5 loads them (its conversion mapping transposes them) but does not save them
        tensors = load_file(out / "model.safetensors")
        for name in tensors:
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if kind == "granite-4.0-h":  # the block kinds under the names IBM publishes (and llama.cpp's
        # converter reads); transformers 5 saves them as linear_attention / full_attention
        config = json.loads((out / "config.json").read_text())
        layer_types = [{"linear_attention": "mamba", "full_attention": "attention"}.get(t, t)
                       for t in config["layer_types"]]
        (out / "config.json").write_text(json.dumps({**config, "layer_types": layer_types}))
    if kind == "nemotron-3-nano":  # the block pattern as NVIDIA publishes it (a string and a count);
        # transformers 5 saves it as layers_block_type and reads both
        config = json.loads((out / "config.json").read_text())
        kinds = config.pop("layers_block_type")
        pattern = "".join({"linear_attention": "M", "mamba": "M", "moe": "E", "full_attention": "*", "attention": "*",
                           "mlp": "-"}[k] for k in kinds)
        (out / "config.json").write_text(json.dumps({**config, "hybrid_override_pattern": pattern,
                                                     "num_hidden_layers": len(kinds)}))
    if kind == "hunyuan-moe":  # per-layer lists, as Tencent publishes them (llama.cpp's converter reads
        # moe_intermediate_size, moe_topk and num_shared_expert as lists; transformers 5 saves none of them)
        config = json.loads((out / "config.json").read_text())
        n = config["num_hidden_layers"]
        (out / "config.json").write_text(json.dumps({
            **config, "moe_topk": [config["moe_topk"]] * n, "moe_intermediate_size": [config["intermediate_size"]] * n,
            "num_shared_expert": [1] * n, "use_mixed_mlp_moe": True, "use_qk_norm": True, "use_cla": False}))
        # and a copy of the tied head, which its converter skips (conversion/hunyuan.py modify_tensors):
        # the reader must skip it too
        tensors = load_file(out / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if kind == "kimi-linear":  # config.json as Moonshot publishes it (and llama.cpp's converter reads
        # it): the block kinds in linear_attn_config (1-based), first_k_dense_replace, the router's
        # sigmoid; transformers 5 saves its own keys instead. The dense block's MLP as published
        # (model.layers.0.mlp.*): transformers 5 saves it under block_sparse_moe.
        config = json.loads((out / "config.json").read_text())
        kinds, _ = config.pop("layer_types"), config.pop("mlp_layer_types")
        config["linear_attn_config"] = {
            "full_attn_layers": [i + 1 for i, k in enumerate(kinds) if k == "full_attention"],
            "kda_layers": [i + 1 for i, k in enumerate(kinds) if k == "linear_attention"],
            "num_heads": config.pop("linear_num_heads"), "head_dim": config.pop("linear_head_dim"),
            "short_conv_kernel_size": config.pop("linear_conv_kernel_dim")}
        (out / "config.json").write_text(json.dumps({**config, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                                                     "moe_router_activation_func": "sigmoid",
                                                     "num_nextn_predict_layers": 0}))
        tensors = load_file(out / "model.safetensors")
        tensors = {k.replace("model.layers.0.block_sparse_moe.", "model.layers.0.mlp.", 1): t for k, t in tensors.items()}
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if kind == "phi-3.5-moe":  # the class name Phi-3.5-MoE's config.json gives (and llama.cpp registers)
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "architectures": ["PhiMoEForCausalLM"]}))
    for f in fixture("deepseek2").iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def _convert_as_alphaq_does(hf: Path, out: Path) -> Path:
    """llama.cpp's converter with --no-mtp where alphaq passes it (Qwen3-Next's converter stops
    without it on a checkpoint that has no MTP weights)."""
    from alphaq.model.weights import converter_mtp_args
    from convert.hf_to_gguf import convert_hf

    return convert_hf(hf, out, extra=converter_mtp_args(hf)).path


OUTSIDE_THE_ZOO = {  # kind -> (GGUF architecture, its block count, some matrix kinds the file must hold)
    "deepseek-v3": ("deepseek2", 3, {"ffn_gate_exps", "ffn_down_shexp", "attn_q_a", "attn_k_b", "ffn_up"}),
    "glm-4.5": ("glm4moe", 3, {"ffn_up_exps", "ffn_gate_shexp", "attn_q", "ffn_down"}),
    "glm-4.5v": ("glm4moe", 3, {"ffn_up_exps", "ffn_gate_shexp", "attn_q", "ffn_down", "output"}),
    "solar-open": ("glm4moe", 3, {"ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "attn_q", "attn_output", "output"}),
    "glm-4.7-flash": ("deepseek2", 3, {"ffn_up_exps", "ffn_gate_shexp", "attn_q_a", "attn_k_b", "ffn_down"}),
    "olmoe": ("olmoe", 2, {"ffn_gate_exps", "ffn_down_exps", "attn_q", "attn_output"}),
    "minimax-m2": ("minimax-m2", 2, {"ffn_gate_exps", "ffn_down_exps", "attn_q", "output"}),
    "ernie-4.5": ("ernie4_5-moe", 3, {"ffn_up_exps", "ffn_down_shexp", "ffn_gate", "attn_v"}),
    "dots1": ("dots1", 3, {"ffn_up_exps", "ffn_down_shexp", "ffn_gate", "attn_k", "output"}),
    "afmoe": ("afmoe", 3, {"ffn_up_exps", "ffn_down_shexp", "attn_gate", "ffn_up"}),
    "qwen3-next": ("qwen3next", 4, {"attn_qkv", "attn_gate", "ssm_out", "ssm_ba", "ffn_up_exps", "attn_q"}),
    "qwen3.5-moe": ("qwen35moe", 4, {"attn_qkv", "attn_gate", "ssm_out", "ssm_alpha", "ffn_down_shexp", "attn_q"}),
    "qwen3-vl-moe": ("qwen3vlmoe", 2, {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "attn_q", "output"}),
    "qwen3-omni-moe": ("qwen3vlmoe", 2, {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "attn_q", "attn_output",
                                        "output"}),
    "llama-4": ("llama4", 4, {"ffn_gate_exps", "ffn_down_exps", "ffn_up_shexp", "attn_k", "output"}),
    "granite-moe": ("granitemoe", 2, {"ffn_gate_exps", "ffn_up_exps", "ffn_gate_shexp", "attn_q", "attn_k"}),
    "granite-4.0-h": ("granitehybrid", 4, {"ssm_in", "ssm_out", "ffn_up_exps", "ffn_up_shexp", "attn_q"}),
    "phi-3.5-moe": ("phimoe", 2, {"ffn_gate_exps", "ffn_down_exps", "attn_q", "attn_output", "output"}),
    "lfm2-moe": ("lfm2moe", 4, {"shortconv.in_proj", "shortconv.out_proj", "attn_q", "ffn_up_exps", "ffn_down"}),
    "jamba": ("jamba", 4, {"ssm_in", "ssm_out", "ffn_up_exps", "attn_q"}),
    "exaone-moe": ("exaone-moe", 4, {"ffn_up_exps", "ffn_up_shexp", "attn_q", "ffn_down"}),
    "cohere2-moe": ("cohere2moe", 4, {"ffn_up_exps", "attn_q", "attn_output"}),
    "nemotron-3-nano": ("nemotron_h_moe", 4, {"ssm_in", "ssm_out", "ffn_up_exps", "ffn_down_shexp", "attn_q"}),
    "dbrx": ("dbrx", 2, {"attn_qkv", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "output"}),
    "hunyuan-moe": ("hunyuan-moe", 2, {"attn_q", "attn_output", "ffn_gate_exps", "ffn_down_exps", "ffn_up_shexp"}),
    "kimi-linear": ("kimi-linear", 4, {"attn_q", "attn_k", "ssm_f_a", "ssm_g_b", "ssm_beta", "attn_kv_a_mqa", "attn_k_b",
                                       "attn_v_b", "ffn_gate_exps", "ffn_up_shexp", "ffn_down"}),
    "llama": ("llama", 2, {"attn_q", "attn_k", "ffn_gate", "ffn_down", "output"}),
    "qwen2": ("qwen2", 2, {"attn_q", "attn_v", "ffn_up", "ffn_down", "output"}),
    "qwen3": ("qwen3", 2, {"attn_q", "attn_output", "ffn_gate", "ffn_up", "output"}),
}


@pytest.fixture(scope="module", params=sorted(OUTSIDE_THE_ZOO))
def outside_the_zoo(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(kind, HF checkpoint, the BF16 GGUF llama.cpp's converter makes of it)."""
    work = tmp_path_factory.mktemp(request.param)
    hf = _random_checkpoint(request.param, work / "hf")
    return request.param, hf, _convert_as_alphaq_does(hf, work / "bf16.gguf")


def test_other_architectures_read_as_llama_cpp_converts_them(outside_the_zoo):
    kind, hf_dir, gguf_path = outside_the_zoo
    arch, n_blocks, kinds = OUTSIDE_THE_ZOO[kind]
    with open_model(hf_dir) as hf, open_model(gguf_path) as gg:
        assert hf.arch == gg.arch == arch and gg.n_blocks == n_blocks
        same_matrices(hf, gg)
        assert kinds <= {m.kind for m in gg.matrices()}
    a = analyze_model(hf_dir, use_cache=False, progress=False)
    b = analyze_model(gguf_path, use_cache=False, progress=False)
    assert [(s.tensor, s.expert, s.alpha) for s in a] == [(s.tensor, s.expert, s.alpha) for s in b]


def test_other_architectures_convert_and_run_in_llama_cpp(outside_the_zoo, tmp_path):
    import llama_cpp

    import alphaq

    kind, hf_dir, _ = outside_the_zoo
    out = tmp_path / "out.gguf"
    r = alphaq.convert(hf_dir, out, mode="fast", budget=3)
    assert r.tensor_counts and out.stat().st_size == r.file_bytes
    model = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    assert model.metadata["general.architecture"] == OUTSIDE_THE_ZOO[kind][0]
    assert model("def", max_tokens=4, temperature=0)["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module", params=["glm-4.5", "glm-4.7-flash", "qwen3-next"])
def with_mtp(request, tmp_path_factory) -> tuple[Path, int]:
    """(a random checkpoint with a NextN (multi-token prediction) layer appended, as real GLM-4.5,
    GLM-4.7-Flash and Qwen3-Next checkpoints have, the block llama.cpp's converter would make of
    it): a copy of the last (full-attention) decoder layer plus the projection of embedding and
    hidden state and its norms, in GLM's naming (model.layers.N.eh_proj, enorm, ...) or Qwen's
    (mtp.layers.0.*, mtp.fc, mtp.pre_fc_norm_*), whose config does not count it."""
    out = _random_checkpoint(request.param, tmp_path_factory.mktemp("mtp") / "hf")
    config = json.loads((out / "config.json").read_text())
    n, h = config["num_hidden_layers"], config["hidden_size"]
    qwen = request.param.startswith("qwen")
    layer, fc, norms = (("mtp.layers.0", "mtp.fc", ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")) if qwen
                        else (f"model.layers.{n}", f"model.layers.{n}.eh_proj", ("enorm", "hnorm", "shared_head.norm")))
    tensors = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name, t in list(tensors.items()):
        if name.startswith(f"model.layers.{n - 1}."):
            copy = (t.float() + 0.01 * torch.randn(t.shape, generator=gen)).to(t.dtype)
            tensors[name.replace(f"model.layers.{n - 1}", layer, 1)] = copy
    tensors[f"{fc}.weight"] = (0.05 * torch.randn(h, 2 * h, generator=gen)).bfloat16()
    for norm in norms:
        tensors[f"{'mtp' if qwen else layer}.{norm}.weight"] = torch.ones(h).bfloat16()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if not qwen:
        (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return out, n


def test_a_nextn_layer_is_left_out_of_the_conversion(with_mtp, tmp_path, caplog):
    """llama.cpp's GLM and Qwen3-Next converters keep NextN layers, which its main graph never
    reads; alphaq converts with --no-mtp (said in a warning), the file has no NextN block, and
    the reader skips the layer without a warning per tensor."""
    import logging

    import alphaq
    from alphaq.model.weights import mtp_blocks, mtp_layers_left_out
    from alphaq.pipeline.convert import tensor_infos
    from convert.hf_to_gguf import convert_hf

    hf, block = with_mtp
    assert mtp_layers_left_out(hf) == 1
    kept = convert_hf(hf, tmp_path / "kept.gguf").path  # llama.cpp's own default keeps it
    assert mtp_blocks(t.name for t in tensor_infos(kept)) == [block]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alphaq.model"), open_model(hf) as model:
        assert max(m.block for m in model.matrices() if m.block is not None) == block - 1
    assert not caplog.records
    r = alphaq.convert(hf, tmp_path / "out.gguf", mode="fast", budget=3)
    assert mtp_blocks(t.name for t in tensor_infos(r.output)) == []
    assert not any(f".{block}." in t.name for t in tensor_infos(r.output))
    assert any("NextN (multi-token prediction) layer(s)" in w and "--no-mtp" in w for w in r.warnings)


def test_the_damage_mode_refuses_a_float_gguf_with_a_nextn_layer(with_mtp, tmp_path, capsys):
    from alphaq.cli import main
    from convert.hf_to_gguf import convert_hf

    hf, block = with_mtp
    kept = convert_hf(hf, tmp_path / "kept.gguf").path
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    assert main(["convert", str(kept), "-o", str(out), "--budget", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"NextN (multi-token prediction) layer(s) in block(s) {block}" in err and "--fast" in err
    assert list(out.parent.iterdir()) == []


def test_ernies_multi_token_prediction_block_is_left_out_as_llama_cpp_does(tmp_path, caplog):
    """ERNIE-4.5 checkpoints carry an MTP block (model.mtp_block.N.*, mtp_linear_proj, ...) that
    llama.cpp's converter drops; the reader drops it too, without a warning per tensor."""
    import logging


    from convert.hf_to_gguf import convert_hf

    hf = _random_checkpoint("ernie-4.5", tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    h = json.loads((hf / "config.json").read_text())["hidden_size"]
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.2."):
            tensors[name.replace("model.layers.2.", "model.mtp_block.0.", 1)] = t.clone()
    tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(h, 2 * h).bfloat16()
    for norm in ("mtp_emb_norm", "mtp_hidden_norm"):
        tensors[f"model.{norm}.0.weight"] = torch.ones(h).bfloat16()
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    gguf_path = convert_hf(hf, tmp_path / "bf16.gguf").path
    with caplog.at_level(logging.WARNING, logger="alphaq"), open_model(hf) as a, open_model(gguf_path) as b:
        same_matrices(a, b)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _as_fp8(src: Path, out: Path, block: int = 128) -> Path:
    """``src`` as DeepSeek publishes V3 and R1: every linear weight of the blocks (not norms, not the
    router) in float8 e4m3 with a float32 scale per 128 x 128 block (``weight_scale_inv``, by which
    the FP8 values are multiplied), and quantization_config fp8 in config.json."""

    shutil.copytree(src, out)
    tensors = {}
    for name, w in load_file(out / "model.safetensors").items():
        if w.ndim != 2 or "layers." not in name or "norm" in name or name.endswith("mlp.gate.weight"):
            tensors[name] = w
            continue
        (r, c), (rb, cb) = w.shape, (-(-w.shape[0] // block), -(-w.shape[1] // block))
        padded = torch.zeros(rb * block, cb * block)
        padded[:r, :c] = w.float()
        blocks = padded.reshape(rb, block, cb, block)
        scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
        tensors[name] = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:r, :c].to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_an_fp8_checkpoint_converts_through_llama_cpps_dequantisation(tmp_path, capsys):
    """DeepSeek-V3 as published (FP8 blocks): the shapes are read from the checkpoint, the values
    from the BF16 GGUF llama.cpp's converter dequantises it to; `alphaq analyze` on the FP8
    checkpoint itself is refused before any work."""
    import llama_cpp

    import alphaq
    from alphaq.cli import main
    from convert.hf_to_gguf import convert_hf

    fp8 = _as_fp8(_random_checkpoint("deepseek-v3", tmp_path / "bf16-hf"), tmp_path / "fp8-hf")
    gguf_path = convert_hf(fp8, tmp_path / "bf16.gguf").path
    with open_model(fp8) as hf, open_model(gguf_path) as gg:
        shapes = [(m.tensor, m.expert, m.rows, m.cols) for m in hf.matrices()]
        assert shapes == [(m.tensor, m.expert, m.rows, m.cols) for m in gg.matrices()]
        assert {m.dtype for m in hf.matrices()} == {"F8_E4M3", "BF16"}  # (embeddings and routers stay BF16)
    r = alphaq.convert(fp8, tmp_path / "out.gguf", mode="fast", budget=3)
    from_gguf = alphaq.plan(gguf_path, budget=3)
    assert [(i.tensor, i.type) for i in r.plan.items] == [(i.tensor, i.type) for i in from_gguf.items]
    assert llama_cpp.Llama(str(r.output), n_ctx=64, verbose=False)("def", max_tokens=2)["usage"]["completion_tokens"]
    csv = tmp_path / "a.csv"
    capsys.readouterr()  # (transformers' progress when the checkpoint was made)
    assert main(["analyze", str(fp8), "--csv", str(csv), "--no-cache", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "matrices are FP8" in err and not csv.exists()


@pytest.mark.parametrize("kind, recurrent", [("qwen3-next", True), ("granite-4.0-h", True), ("dots1", False)])
def test_the_time_estimate_says_when_recurrent_blocks_make_it_rough(kind, recurrent, tmp_path):
    """The pre-flight's forward rates come from attention models; for a model with gated-DeltaNet
    or Mamba-2 blocks the default mode's estimate says that what they change is unmeasured (the
    fast mode runs no forward pass)."""
    from alphaq.allocate.plan import MODES, PlanConfig
    from alphaq.pipeline.convert import ConvertConfig
    from alphaq.pipeline.preflight import preflight

    hf = _random_checkpoint(kind, tmp_path / "hf")
    said = "how this model's recurrent blocks change the forward stages' time"
    for mode, forward in (("damage", True), ("fast", False)):
        cfg = ConvertConfig(model=hf, output=tmp_path / "o.gguf", plan=PlanConfig(**MODES[mode]))
        with open_model(hf) as model:
            assert (said in preflight(cfg, model).format(None)) == (recurrent and forward)
