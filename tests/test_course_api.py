"""The course-shaped surface, name by name, against diffusers and transformers on the same weights: what a model
returns (.sample, ["sample"], [0], return_dict=False), models built from keyword arguments, the VAE's latent_dist,
the text encoder's transformers internals (the Deep Dive's get_output_embeds), the pipelines' components,
encode_prompt / _encode_prompt / decode_latents, and the traps found porting the notebooks: a string negative
prompt, a loaded model that must stay trainable. Tolerance 0.0: both sides run the same float32 operations on the
same tensors (see tests/test_stable_diffusion.py's docstring)."""

import pytest
import torch
from diffusers import UNet2DModel as DiffusersUNet2DModel
from helpers import max_diff, randn, seeded
from test_stable_diffusion import TINY_TEXT, TINY_UNET, TINY_VAE, components, pipelines
from test_tokenizer import model_folders  # noqa: F401 (a fixture used below)
from test_unet2d import TINY, make_pair

import minidiff
from minidiff import (
    AutoencoderKL,
    ClassConditionedUNet,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DModel,
)
from minidiff.models.clip import causal_attention_mask


@pytest.fixture(scope="module")
def folder(model_folders):  # noqa: F811
    return model_folders["sd1"]


@pytest.fixture(scope="module")
def tiny():
    return components(TINY_UNET, TINY_VAE, TINY_TEXT)


def test_every_course_name_is_importable():
    names = ["UNet2DModel", "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPTokenizer", "DDPMScheduler",
             "DDIMScheduler", "PNDMScheduler", "DDPMPipeline", "DDIMPipeline", "StableDiffusionPipeline",
             "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"]
    assert [n for n in names if not hasattr(minidiff, n)] == []


def test_unet_output_forms_match_diffusers():
    reference, ours = make_pair(**TINY)
    x, t = randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        expected = reference(x, t).sample
        forms = [ours(x, t).sample, ours(x, t)["sample"], ours(x, t)[0], ours(x, t, return_dict=False)[0]]
    assert isinstance(ours(x, t, return_dict=False), tuple) and len(ours(x, t, return_dict=False)) == 1
    assert all(max_diff(form, expected) == 0.0 for form in forms)


def test_unet_from_keyword_arguments_as_the_class_conditioned_notebook():
    kwargs = dict(sample_size=28, in_channels=1 + 4, out_channels=1, layers_per_block=2,
                  block_out_channels=(32, 64, 64),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    reference = DiffusersUNet2DModel(**kwargs)
    ours = UNet2DModel(**kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    ours.load_state_dict(reference.state_dict())  # diffusers' names: the weights load by identity
    x = randn(2, 5, 28, 28)
    with torch.no_grad():
        assert max_diff(ours(x, 10).sample, reference(x, 10).sample) == 0.0
    with pytest.raises(TypeError, match="sample_sise"):
        UNet2DModel(sample_sise=28)
    assert ClassConditionedUNet(num_classes=3, class_emb_size=2, unet=dict(TINY, in_channels=5)).config.num_classes == 3


def test_vae_outputs_match_diffusers(tiny):
    reference, ours = tiny["reference"]["vae"], tiny["ours"]["vae"]
    x = randn(1, 3, 16, 16)
    with torch.no_grad():
        expected, got = reference.encode(x).latent_dist, ours.encode(x).latent_dist
        assert max_diff(got.mean, expected.mean) == 0.0 and max_diff(got.mode(), expected.mode()) == 0.0
        assert max_diff(got.sample(seeded(1)), expected.sample(seeded(1))) == 0.0
        assert ours.encode(x, return_dict=False)[0].mean.shape == expected.mean.shape
        z = expected.mean
        assert max_diff(ours.decode(z).sample, reference.decode(z).sample) == 0.0
        assert max_diff(ours.decode(z, return_dict=False)[0], reference.decode(z, return_dict=False)[0]) == 0.0
        assert max_diff(ours(x).sample, reference(x).sample) == 0.0


def test_text_encoder_internals_as_the_deep_dive_uses_them(tiny, folder):
    """The Deep Dive's cells 23-33 with minidiff's text encoder: every step equals transformers' text encoder on the
    same weights, and its hand-built get_output_embeds equals the plain call. (transformers 5 flattened
    text_model away, as minidiff's layout is, so the course's text_encoder.text_model.* runs on minidiff only.)"""
    reference, ours = tiny["reference"]["text_encoder"], tiny["ours"]["text_encoder"]
    tokenizer = minidiff.CLIPTokenizer.from_folder(folder)
    ids = tokenizer(["A picture of a puppy"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids)[0]
        assert max_diff(ours(ids)[0], expected) == 0.0
        assert max_diff(ours(ids)["last_hidden_state"], reference(ids)["last_hidden_state"]) == 0.0
        assert max_diff(ours(ids).pooler_output, reference(ids).pooler_output) == 0.0

        token_emb_layer = ours.text_model.embeddings.token_embedding
        pos_emb_layer = ours.text_model.embeddings.position_embedding
        position_ids = ours.text_model.embeddings.position_ids[:, :77]
        assert torch.equal(position_ids, reference.embeddings.position_ids[:, :77])
        input_embeddings = token_emb_layer(ids) + pos_emb_layer(position_ids)
        assert max_diff(input_embeddings, reference.embeddings(ids)) == 0.0
        assert max_diff(ours.text_model.embeddings(ids), input_embeddings) == 0.0
        assert max_diff(ours.get_input_embeddings()(ids), reference.get_input_embeddings()(ids)) == 0.0

        # get_output_embeds, as the notebook writes it (transformers 4.25's private mask builder included)
        bsz, seq_len = input_embeddings.shape[:2]
        causal_mask = ours.text_model._build_causal_attention_mask(bsz, seq_len, dtype=input_embeddings.dtype)
        encoder_outputs = ours.text_model.encoder(inputs_embeds=input_embeddings, attention_mask=None,
                                                  causal_attention_mask=causal_mask, output_attentions=None,
                                                  output_hidden_states=True, return_dict=None)
        output = ours.text_model.final_layer_norm(encoder_outputs[0])
        # a float mask instead of SDPA's built-in causal one: the same softmax weights, summed in another kernel
        assert max_diff(output, expected) <= 1e-6
        assert torch.equal(causal_mask, causal_attention_mask(bsz, seq_len))
        assert causal_mask[0, 0, 0, 1] == torch.finfo(torch.float32).min and causal_mask[0, 0, 1, 0] == 0


def test_resize_token_embeddings_and_textual_inversion_by_hand(tiny, folder):
    """The textual-inversion notebook's load_learned_embed_in_clip: add_tokens, resize, write the row."""
    ours = components(TINY_UNET, TINY_VAE, TINY_TEXT, seed=1)["ours"]["text_encoder"]
    tokenizer = minidiff.CLIPTokenizer.from_folder(folder)
    assert tokenizer.add_tokens("<birb-style>") == 1
    token_id = tokenizer.convert_tokens_to_ids("<birb-style>")
    ours.resize_token_embeddings(len(tokenizer))
    vector = randn(32)
    ours.get_input_embeddings().weight.data[token_id] = vector
    ids = tokenizer("a <birb-style> bird", return_tensors="pt").input_ids
    assert ids[0, 2] == token_id and torch.equal(ours.text_model.embeddings.token_embedding(ids)[0, 2], vector)
    assert ours.config.vocab_size == len(tokenizer) == 49409


def test_encode_prompt_takes_a_string_negative_prompt(tiny, folder):
    """The trap: encode_prompt(prompt, device, 1, True, "") once returned one negative prompt per character."""
    reference, ours = pipelines(tiny, folder)
    with torch.no_grad():
        expected = reference.encode_prompt("a cat", "cpu", 1, True, "")
        got = ours.encode_prompt("a cat", "cpu", 1, True, "")
        assert [t.shape for t in got] == [t.shape for t in expected] == [(1, 77, 32)] * 2
        assert all(max_diff(g, e) == 0.0 for g, e in zip(got, expected, strict=True))
        legacy = ours._encode_prompt("a cat", "cpu", 2, True, "blurry")
        assert legacy.shape == (4, 77, 32)
        assert max_diff(legacy, reference._encode_prompt("a cat", "cpu", 2, True, "blurry")) == 0.0
        assert ours.encode_prompt(["a", "b"], "cpu", 1, False)[1] is None


def test_pipeline_components_outputs_and_decode_latents(tiny, folder):
    reference, ours = pipelines(tiny, folder)
    ours.set_progress_bar_config(disable=True)
    assert set(ours.components) <= set(reference.components)
    assert set(reference.components) - set(ours.components) == {"image_encoder"}
    args = dict(prompt="a red circle", num_inference_steps=3, height=16, width=16)
    out = ours(**args, generator=seeded(0))
    expected = reference(**args, generator=seeded(0))
    assert [image.tobytes() for image in out.images] == [image.tobytes() for image in expected.images]
    assert out.nsfw_content_detected is None
    np_images = ours(**args, generator=seeded(0), output_type="np").images
    assert max_diff(torch.from_numpy(np_images), torch.from_numpy(reference(**args, generator=seeded(0),
                                                                           output_type="np").images)) == 0.0
    tuple_out = ours(**args, generator=seeded(0), output_type="pt", return_dict=False)
    assert isinstance(tuple_out, tuple) and tuple_out[0].shape == (1, 3, 16, 16)
    latents = randn(1, 4, 8, 8)
    with torch.no_grad():
        assert max_diff(torch.from_numpy(ours.decode_latents(latents)),
                        torch.from_numpy(reference.decode_latents(latents))) == 0.0
    assert ours.numpy_to_pil(np_images)[0].size == (16, 16)

    img2img = StableDiffusionImg2ImgPipeline(**ours.components)  # Unit 3's img2img_pipe, from pipe.components
    img2img.set_progress_bar_config(disable=True)
    assert img2img.unet is ours.unet
    image = out.images[0]
    assert img2img(prompt="a blue square", image=image, strength=0.6, num_inference_steps=3).images[0].size == (16, 16)
    inpaint = StableDiffusionInpaintPipeline(**ours.components)
    inpaint.set_progress_bar_config(disable=True)
    assert inpaint(prompt="a cat", image=image, mask_image=image, num_inference_steps=2).images[0].size == (16, 16)
    with pytest.raises(ValueError, match="safety checker"):
        StableDiffusionPipeline(**{**ours.components, "safety_checker": object()})
    assert ours.to(torch.float64) is ours and ours.dtype == torch.float64


def test_pixel_pipelines_as_unit_2_uses_them():
    reference, ours = make_pair(**TINY)
    schedule = dict(num_train_timesteps=100)
    pipe = DDPMPipeline(unet=ours, scheduler=DDPMScheduler(**schedule))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.num_train_timesteps == 100  # the notebook reads it as an attribute
    images = pipe(batch_size=2, generator=seeded(0), num_inference_steps=5).images
    assert len(images) == 2 and images[0].size == (16, 16)
    ddim = DDIMPipeline(unet=ours, scheduler=pipe.scheduler)
    assert type(ddim.scheduler) is DDIMScheduler and ddim.scheduler.config.num_train_timesteps == 100
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the notebook's swap
    assert pipe(generator=seeded(0), num_inference_steps=4, output_type="np").images.shape == (1, 16, 16, 3)
    assert "num_train_timesteps" in repr(pipe.scheduler)


def test_a_model_stays_trainable():
    """The trap: a loaded UNet was frozen, so the notebook's fine-tuning loop failed at backward. Built models
    train; loaded ones too (tests/test_pretrained.py)."""
    _, ours = make_pair(**TINY)
    ours.train()
    loss = ours(randn(1, 3, 16, 16), 5, return_dict=False)[0].pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    assert sum(p.requires_grad for p in ours.parameters()) == len(list(ours.parameters()))


def test_autoencoder_from_keyword_arguments():
    vae = AutoencoderKL(**TINY_VAE)
    assert vae.config.latent_channels == 4 and vae.config.block_out_channels == (32, 64)


@pytest.mark.parametrize("model", ["UNet2DModel", "UNet2DConditionModel", "AutoencoderKL"])
def test_same_seed_same_initial_weights_as_diffusers(model):
    """The class-conditioned notebook trains its UNet from torch.manual_seed's init: the modules are built in
    diffusers' order (resnet, attention, resnet, ...), so the same seed gives the same starting weights."""
    import diffusers

    kwargs = {"UNet2DModel": dict(TINY, layers_per_block=2), "UNet2DConditionModel": TINY_UNET,
              "AutoencoderKL": TINY_VAE}[model]
    torch.manual_seed(0)
    expected = getattr(diffusers, model)(**kwargs).state_dict()
    torch.manual_seed(0)
    got = getattr(minidiff, model)(**kwargs).state_dict()
    assert sorted(got) == sorted(expected)  # registration order differs (diffusers lists attentions first)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_logging_set_verbosity_error_silences_minidiff_warnings():
    import warnings

    from minidiff.models.unet import UNet2DConfig

    try:
        minidiff.logging.set_verbosity_error()
        with warnings.catch_warnings(record=True) as caught:
            UNet2DConfig.from_dict({"not_a_key": 1})
        assert caught == []
    finally:
        minidiff.logging.set_verbosity_warning()
    with pytest.warns(UserWarning, match="not_a_key"):
        UNet2DConfig.from_dict({"not_a_key": 1})


def test_pipe_load_textual_inversion_as_diffusers(tiny, folder, tmp_path):
    """The course's way: pipe.load_textual_inversion(learned_embeds.bin) (diffusers' format), then the new word in
    a prompt gives the same embeddings as diffusers' pipeline given the same file."""
    reference, ours = pipelines(components(TINY_UNET, TINY_VAE, TINY_TEXT, seed=2), folder)
    torch.save({"<birb-style>": randn(32, seed=3)}, tmp_path / "learned_embeds.bin")
    reference.load_textual_inversion(tmp_path / "learned_embeds.bin")
    assert ours.load_textual_inversion(tmp_path / "learned_embeds.bin") == ["<birb-style>"]
    with torch.no_grad():
        expected = reference.encode_prompt("a <birb-style> bird", "cpu", 1, False)[0]
        got = ours.encode_prompt("a <birb-style> bird", "cpu", 1, False)[0]
    assert max_diff(got, expected) == 0.0
    assert ours.tokenizer("a <birb-style> bird").input_ids == reference.tokenizer("a <birb-style> bird").input_ids
