"""PixArt-α backbone: tiny in-process model, conditioning and CFG against the stock pipeline, LoRA (LCM-LoRA) and full
LCD (PixArt-δ) smoke runs that export, reload into the stock `PixArtAlphaPipeline` and sample 2 steps."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from peft import PeftModel

from lcm.consistency import guided_denoiser
from lcm.encode import encode_text
from lcm.guidance import guidance_scale_from_w
from lcm.lora import add_lora
from lcm.models import noise_schedule_of, student_from_teacher
from lcm.roles import adapters_disabled, denoiser_role
from lcm.sampling import generate, load_pipeline_for_sampling
from lcm.tiny import make_captioned_image_folder, save_tiny_pipeline
from lcm.cli import main as lcm_main

from _helpers import load_entry_script

PIXART_TARGETS = "[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2]"


@pytest.fixture(scope="module")
def tiny_pixart_dir(tmp_path_factory):
    return save_tiny_pipeline("pixart", tmp_path_factory.mktemp("tiny") / "pixart", seed=0)


@pytest.fixture(scope="module")
def pixart_data(tmp_path_factory):
    return make_captioned_image_folder(tmp_path_factory.mktemp("data") / "shapes", n=4, size=16)


def _pipe(path) -> PixArtAlphaPipeline:
    pipe = PixArtAlphaPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_pixart_is_a_real_pixart_with_its_linear_betas(tiny_pixart_dir):
    pipe = _pipe(tiny_pixart_dir)
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)
    assert type(pipe.tokenizer).__name__ == "T5Tokenizer" and type(pipe.text_encoder).__name__ == "T5EncoderModel"
    ids = pipe.tokenizer("a red circle").input_ids
    assert ids[-1] == pipe.tokenizer.eos_token_id and len(ids) == 4  # three whole-word pieces + </s>
    # PixArt's own schedule (linear 0.0001–0.02) is what the distillation uses, not SD's scaled_linear.
    ddpm = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    torch.testing.assert_close(noise_schedule_of(pipe.scheduler).alphas_cumprod.double(),
                               ddpm.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("w", [0.0, 3.5])
def test_role_and_conditioning_match_the_stock_pipeline(tiny_pixart_dir, w):
    """One trailing DDIM step from t = 999 makes the pipeline return x̂₀ (PixArt returns the denoised sample for a
    1-step run): ours, from encode_text + the role + CFG in the LCM convention, must give the same x̂₀."""
    pipe = _pipe(tiny_pixart_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                               set_alpha_to_one=False)
    prompts = ["a red circle on a white background", "a blue square"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    stock = pipe(prompts, num_inference_steps=1, guidance_scale=guidance_scale_from_w(w), latents=z, height=16,
                 width=16, use_resolution_binning=False, clean_caption=False, output_type="latent").images
    cond, uncond = encode_text(pipe, prompts, None, "cpu")
    assert cond["encoder_attention_mask"].shape == cond["encoder_hidden_states"].shape[:2]
    t = torch.full((2,), 999)
    with torch.no_grad():
        x0, _ = guided_denoiser(denoiser_role(pipe.transformer), cond, uncond, torch.full((2,), w),
                                noise_schedule_of(pipe.scheduler), "epsilon")(z, t)
    torch.testing.assert_close(x0, stock, rtol=1e-4, atol=1e-4)


def test_transformer_student_starts_equal_and_trains_independently(tiny_pixart_dir):
    teacher = _pipe(tiny_pixart_dir).transformer
    student = student_from_teacher(teacher, 32)  # no w input on PixArt: a plain fp32 copy
    cond, _ = encode_text(_pipe(tiny_pixart_dir), ["a red circle"], None, "cpu")
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(denoiser_role(student)(z, t, cond, torch.tensor([4.0])),
                                   denoiser_role(teacher)(z, t, cond))
    before = [p.clone() for p in teacher.parameters()]
    denoiser_role(student)(z, t, cond).square().mean().backward()
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # the teacher is untouched
    assert not all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_lora_on_the_transformer_and_its_disabled_base(tiny_pixart_dir):
    pipe = _pipe(tiny_pixart_dir)
    cond, _ = encode_text(pipe, ["a red circle"], None, "cpu")
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    role = denoiser_role(pipe.transformer)
    with torch.no_grad():
        base = role(z, t, cond)
        params = add_lora(pipe.transformer, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
        assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
        for p in params:
            p.add_(0.1)  # non-zero B: the adapter now changes the output
        assert (role(z, t, cond) - base).abs().max() > 1e-4
        with adapters_disabled(pipe.transformer):
            torch.testing.assert_close(role(z, t, cond), base)


def _train_args(teacher, data, out, *extra):
    return ["model.kind=pixart", f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={out}",
            "data.resolution=16", "train.batch_size=2", "train.gradient_accumulation_steps=1",
            "train.max_train_steps=2", "train.mixed_precision=no", "train.gradient_checkpointing=false",
            "train.report_to=none", "train.checkpoint_every=0", "validation.every_n_steps=0", "optim.lr=1e-2",
            "optim.lr_warmup_steps=0",
            *extra]


def _sample_2_steps(pipe, seed=0):
    return pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, height=16, width=16,
                use_resolution_binning=False, clean_caption=False, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.mark.parametrize("w_range", [(3.5, 3.5), (2.0, 6.0)], ids=["fixed-w", "random-w"])
def test_train_lcd_pixart_delta_exports_and_samples_in_stock_pipeline(tiny_pixart_dir, pixart_data, tmp_path,
                                                                       w_range):
    out = tmp_path / "run"
    args = _train_args(tiny_pixart_dir, pixart_data, out, f"distill.w_min={w_range[0]}", f"distill.w_max={w_range[1]}")
    assert load_entry_script("train_lcd").main(["--config", "lcd_pixart", *args]) == 0
    transformer = PixArtTransformer2DModel.from_pretrained(out / "final", subfolder="transformer")
    scheduler = LCMScheduler.from_pretrained(out / "final", subfolder="scheduler")
    # PixArt's linear betas are kept at inference.
    assert (scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.beta_end) == \
        ("linear", 0.0001, 0.02)
    teacher = _pipe(tiny_pixart_dir).transformer
    assert any(not torch.equal(a, b) for a, b in zip(transformer.state_dict().values(),
                                                      teacher.state_dict().values()))  # it trained
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_pixart_dir, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    image = _sample_2_steps(pipe)
    assert image.shape == (16, 16, 3) and 0 <= image.min() and image.max() <= 1
    assert "PixArtTransformer2DModel.from_pretrained" in (out / "final" / "README.md").read_text()
    # `lcm sample --student` swaps the trained transformer into the base pipeline: the same image as above.
    ours = load_pipeline_for_sampling(str(tiny_pixart_dir), student=str(out), device="cpu", dtype="fp32")
    got = generate(ours, ["a red circle"], [0], steps=2, guidance_scale=1.0, height=16, width=16)[0]
    torch.testing.assert_close(torch.tensor(list(got.getdata()), dtype=torch.float32).view(16, 16, 3),
                               torch.tensor(image * 255).round(), atol=2.0, rtol=0)


def test_train_lcm_lora_pixart_loads_with_peft_and_samples_from_the_cli(tiny_pixart_dir, pixart_data, tmp_path):
    out = tmp_path / "run"
    args = _train_args(tiny_pixart_dir, pixart_data, out, f"lora.target_modules={PIXART_TARGETS}", "lora.rank=4")
    assert load_entry_script("train_lcm_lora").main(["--config", "lcm_lora_pixart", *args]) == 0
    final = out / "final"
    # The stock way to load a PixArt LoRA: PEFT's folder format on the pipeline's transformer.
    pipe = _pipe(tiny_pixart_dir)
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(final))
    pipe.scheduler = LCMScheduler.from_pretrained(final, subfolder="scheduler")
    stock = _sample_2_steps(pipe)
    assert stock.shape == (16, 16, 3)
    # Our sampler merges the adapter into a plain transformer: the same images within float tolerance.
    ours = load_pipeline_for_sampling(str(tiny_pixart_dir), [(str(out), 1.0)], device="cpu", dtype="fp32")
    assert isinstance(ours.transformer, PixArtTransformer2DModel) and isinstance(ours.scheduler, LCMScheduler)
    image = generate(ours, ["a red circle"], [0], steps=2, guidance_scale=1.0, height=16, width=16)[0]
    torch.testing.assert_close(torch.tensor(stock * 255).round(), torch.tensor(list(image.getdata()), dtype=torch.float32)
                               .view(16, 16, 3), atol=2.0, rtol=0)
    # …and the base alone differs (the LoRA is really applied), and the CLI runs the same path.
    base = _pipe(tiny_pixart_dir)
    base.scheduler = LCMScheduler.from_pretrained(final, subfolder="scheduler")
    assert abs(_sample_2_steps(base) - stock).max() > 1e-4
    assert lcm_main(["sample", "--base", str(tiny_pixart_dir), "--lora", str(out), "--prompt", "a red circle",
                     "--seeds", "0-1", "--steps", "2", "--height", "16", "--width", "16", "--device", "cpu",
                     "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    with pytest.raises(ValueError, match="PixArt"):  # kohya/fused exports are UNet-only: a clear refusal
        lcm_main(["export", str(out), "--format", "kohya"])


def test_pixart_lora_rejects_stacking_and_diffusers_format(tiny_pixart_dir, tmp_path):
    with pytest.raises(ValueError, match="stacked"):
        load_pipeline_for_sampling(str(tiny_pixart_dir), [("a", 1.0), ("b", 1.0)], device="cpu", dtype="fp32")
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="PEFT"):
        load_pipeline_for_sampling(str(tiny_pixart_dir), [(str(tmp_path), 1.0)], device="cpu", dtype="fp32")


def test_pixart_trains_from_the_latent_cache_with_its_t5_masks(tiny_pixart_dir, pixart_data, tmp_path):
    """The cache is generic over the conditioning dicts: PixArt's T5 states and attention masks round-trip."""
    from lcm.cache import CachedDataset, build_cache
    from lcm.config import load_config
    from lcm.data import build_dataset, collate_fn
    from lcm.encode import lcd_batch_from_data
    from lcm.models import load_pipeline
    from lcm.schedule import SolverGrid

    cache = tmp_path / "cache"
    args = _train_args(tiny_pixart_dir, pixart_data, tmp_path / "run", f"data.cache_dir={cache}")
    cfg = load_config("lcm_lora_pixart", args)
    assert build_cache(cfg, batch_size=2).items == 4
    pipe = load_pipeline("pixart", str(tiny_pixart_dir))
    plain, cached = build_dataset(cfg.data, seed=cfg.train.seed), CachedDataset(cfg, seed=cfg.train.seed)
    lcds = [lcd_batch_from_data(pipe, collate_fn([ds[i] for i in range(2)]),
                                [torch.Generator().manual_seed(i) for i in range(2)], cfg.distill, SolverGrid(1000, 50),
                                "cpu") for ds in (plain, cached)]
    torch.testing.assert_close(lcds[1].z0, lcds[0].z0, atol=1e-5, rtol=1e-5)
    for part in ("cond", "uncond"):
        a, b = getattr(lcds[0], part), getattr(lcds[1], part)
        assert a.keys() == b.keys() and "encoder_attention_mask" in a
        for k in a:
            torch.testing.assert_close(b[k].float(), a[k].float(), atol=1e-5, rtol=1e-5)
    assert load_entry_script("train_lcm_lora").main(["--config", "lcm_lora_pixart", *args,
                                                     f"lora.target_modules={PIXART_TARGETS}"]) == 0
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_discriminator_features_equal_the_transformers_own_blocks(tiny_pixart_dir):
    """The PixArt backbone of the adversarial objectives: token states after a quarter and a half of the blocks, as
    the transformer's own forward computes them (hooks on a full forward)."""
    from lcm.discriminator import build_heads, make_discriminator, teacher_features, transformer_feature_blocks

    pipe = _pipe(tiny_pixart_dir)
    net = pipe.transformer.eval()
    cond, _ = encode_text(pipe, ["a red circle", "a blue square"], None, "cpu")
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 259])
    wanted, seen = transformer_feature_blocks(net), {}
    hooks = [net.transformer_blocks[i - 1].register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, o))
             for i in wanted]
    with torch.no_grad():
        role_out = denoiser_role(net)(z, t, cond)
        for h in hooks:
            h.remove()
        feats = teacher_features(net)(z, t, cond)
    assert role_out.shape == z.shape and len(feats) == len(wanted)
    p = net.config.patch_size
    for i, f in zip(wanted, feats):
        assert f.shape[-2:] == (8 // p, 8 // p)
        assert torch.equal(f.flatten(2).transpose(1, 2), seen[i])
    logits = make_discriminator(teacher_features(net), build_heads(net, hidden=8))(z, t, cond)
    assert logits.shape == (2, len(wanted))
    # adversarial.backbone=trainable: D's own copy of the first half of the blocks, trained alone
    from lcm.discriminator import transformer_encoder_features
    from tests.test_discriminator import _copy_trains_alone

    copy = _copy_trains_alone(net, z, t, cond, transformer_encoder_features)
    assert len(copy.transformer_blocks) == wanted[-1] < len(net.transformer_blocks)


def test_train_add_lora_pixart(tiny_pixart_dir, pixart_data, tmp_path):
    out = tmp_path / "run"
    args = _train_args(tiny_pixart_dir, pixart_data, out, f"lora.target_modules={PIXART_TARGETS}", "lora.rank=4",
                       "adversarial.head_hidden=8", "optim.lr=1e-3")
    assert load_entry_script("train_lcm_lora").main(["--config", "add_lora_pixart", *args]) == 0
    assert (out / "final" / "scheduler" / "scheduler_config.json").is_file()
    assert "EulerAncestralDiscreteScheduler" in (out / "final" / "scheduler" / "scheduler_config.json").read_text()


def test_cpu_lowp_kernels_keep_the_transformer_function(tiny_pixart_dir):
    """bf16 on a CPU swaps PixArt's attention processor too (lcm/cpu_lowp.py): in fp32 it is the same function, text
    attention mask included."""
    from diffusers.models.attention_processor import AttnProcessor

    from lcm import cpu_lowp

    pipe = _pipe(tiny_pixart_dir)
    cond, _ = encode_text(pipe, ["a red circle", "a blue square on green"], None, "cpu")
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 20])
    role = denoiser_role(pipe.transformer)
    with torch.no_grad():
        ref = role(z, t, cond)
        counts = cpu_lowp.install(pipe.transformer)
        out = role(z, t, cond)
    assert counts["attention"] > 0
    assert all(isinstance(p, AttnProcessor) for p in pipe.transformer.attn_processors.values())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
