"""The embedded model: a tiny random-weight FLUX.1 family built locally, in code.

Runs in a **worker process** (the process that owns the diffusers pipelines) and, for the LoRA
catalogue (genserve.loras), in the API process's thread pool on the first /loras request — never on
its event loop: ``ensure_embedded_model`` imports torch/diffusers/transformers lazily and builds a
few-MB model on the CPU the first time it is needed.

Why it exists: a fresh machine may have no GPU and no FLUX.1-dev weights (they are gated and
tens of GB), yet GenServe must still start, serve every endpoint and run its tests through the
*real* diffusers code path (``FluxPipeline``, ``FluxImg2ImgPipeline``, ``FluxFillPipeline``,
``FluxControlNetPipeline``, ``FluxControlNetImg2ImgPipeline``, ``FluxPriorReduxPipeline``).  The embedded model has the
real FLUX.1-dev *shapes that matter* (16 latent channels, VAE scale factor 8, 2x2 latent
packing, guidance-distilled transformer, FLUX.1-dev scheduler config, CLIP + T5 text stacks)
but tiny widths and random weights.  **Images generated with it are noise**; only their
size, determinism and timing are meaningful.

Layout written under ``cache_dir/<versioned name>/``:

* ``base/``        ``FluxPipeline.save_pretrained`` output (model_index.json, transformer/,
                   vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)
* ``fill/``        ``transformer/`` only: a FLUX.1-Fill-style ``FluxTransformer2DModel``
                   (in_channels=384, out_channels=64)
* ``controlnet/``  ``FluxControlNetModel.save_pretrained`` output (union ControlNet,
                   num_mode=10; ``control_mode`` must be passed to the pipelines)
* ``redux/``       ``FluxPriorReduxPipeline.save_pretrained`` output laid out like
                   ``black-forest-labs/FLUX.1-Redux-dev`` (model_index.json, image_encoder/ (SiglipVisionModel),
                   feature_extractor/ (SiglipImageProcessor), image_embedder/ (ReduxImageEncoder); no text
                   encoders: the worker shares the base pipeline's).  SigLIP at 64x64 px, patch 16 -> 16 image
                   tokens; the embedder maps the SigLIP width to the transformer's ``joint_attention_dim``
* ``loras/``       two rank-4 LoRAs for the base transformer in diffusers/PEFT format
                   (``embedded-style.safetensors``, ``embedded-detail.safetensors``): random, with
                   non-zero ``lora_B``, so applying one visibly changes an image

The build is deterministic (fixed seed per component, so two builds give bit-identical
weights) and safe against concurrent callers (``fcntl.flock`` + build in a temporary sibling
folder + completion marker + atomic rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import string
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genserve.durable import fsync_dir

if TYPE_CHECKING:  # heavy imports stay lazy: the front end may import this module
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxPriorReduxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, PreTrainedTokenizerBase, T5EncoderModel

logger = logging.getLogger(__name__)

# Bump whenever anything below changes the produced files: it is part of the folder name, so
# an old cache is simply ignored (never half-reused).
EMBEDDED_MODEL_VERSION: str = "3"  # 3: redux/

_FOLDER_NAME = f"flux-embedded-v{EMBEDDED_MODEL_VERSION}"
_MARKER_NAME = "EMBEDDED_MODEL_COMPLETE.json"
_BUILDING_PREFIX = f".{_FOLDER_NAME}.building-"
_STALE_PREFIX = f".{_FOLDER_NAME}.stale-"

_SEED = 20240801
# One seed per component so that changing one component leaves the others' weights unchanged.
_SEED_OFFSETS: dict[str, int] = {
    "text_encoder": 1,
    "text_encoder_2": 2,
    "vae": 3,
    "transformer": 4,
    "fill_transformer": 5,
    "controlnet": 6,
    "lora_embedded-style": 7,
    "lora_embedded-detail": 8,
    "redux_image_encoder": 9,
    "redux_image_embedder": 10,
}

# --- recipe -------------------------------------------------------------------------------
_CLIP_HIDDEN = 32  # == transformer pooled_projection_dim
_CLIP_MAX_LENGTH = 77
_T5_D_MODEL = 32  # == transformer joint_attention_dim
_T5_MAX_LENGTH = 512
_LATENT_CHANNELS = 16  # real FLUX
_PACKED_CHANNELS = _LATENT_CHANNELS * 4  # 2x2 packing -> 64
# Four blocks -> vae_scale_factor 8 (real FLUX); only 4 channels at full resolution keeps a
# 1024x1024 decode at ~0.35 s on two CPU threads.
_VAE_BLOCK_OUT_CHANNELS = (4, 8, 16, 16)
_VAE_NORM_GROUPS = 4  # divides every entry of _VAE_BLOCK_OUT_CHANNELS
_FILL_IN_CHANNELS = _PACKED_CHANNELS * 2 + 8 * 8 * 4  # latents + masked latents + packed mask = 384
_CONTROLNET_NUM_MODE = 10
_TRANSFORMER_SHAPE: dict[str, Any] = {
    "patch_size": 1,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": _T5_D_MODEL,
    "pooled_projection_dim": _CLIP_HIDDEN,
    "guidance_embeds": True,  # FLUX.1-dev is guidance-distilled
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim, each even
}
# Names of the embedded LoRAs (files loras/NAME.safetensors).
EMBEDDED_LORAS: tuple[str, ...] = ("embedded-style", "embedded-detail")
_LORA_RANK = 4
# Every attention projection of the double blocks; "detail" also adapts the single blocks' MLP input, so the two
# LoRAs differ in what they touch as well as in their weights.
_LORA_DOUBLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_LORA_SINGLE_TARGETS: dict[str, tuple[str, ...]] = {"embedded-style": (), "embedded-detail": ("proj_mlp",)}
# lora_B's std, relative to 1/sqrt(rank): with lora_A at 1/sqrt(in_features), B @ A has about this many times the
# spread of the base weights (default nn.Linear init). The tiny random model damps a change a lot: at 0.5 weight 1.0
# moved a 64x64 image's pixels by 0.005 on average; at 4 it moves them by about 0.04 (the image's own std is 0.16),
# clearly visible, and still finite at loras.max_weight.
_LORA_B_SCALE = 4.0

# FLUX.1-Redux-dev: SigLIP so400m (1152 wide, 384 px, patch 14 -> 729 tokens) and a ReduxImageEncoder 1152 -> 4096 (T5).
# Tiny: a width unlike every other one here (so a mismatched embedder fails loudly), 64 px, patch 16 -> 16 tokens.
_SIGLIP_HIDDEN = 48  # == ReduxImageEncoder redux_dim
_SIGLIP_IMAGE_SIZE = 64
_SIGLIP_PATCH_SIZE = 16
REDUX_IMAGE_TOKENS: int = (_SIGLIP_IMAGE_SIZE // _SIGLIP_PATCH_SIZE) ** 2  # prompt tokens the Redux image adds

# FLUX.1-dev's scheduler/scheduler_config.json
_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@dataclass(frozen=True)
class EmbeddedModelPaths:
    """Folders of a built embedded model, laid out like real checkpoints."""

    base: Path  # FluxPipeline.from_pretrained(base)
    fill: Path  # FluxTransformer2DModel.from_pretrained(fill, subfolder="transformer")
    controlnet: Path  # FluxControlNetModel.from_pretrained(controlnet)
    loras: Path  # NAME.safetensors LoRAs of the base transformer: pipe.load_lora_weights(loras / "NAME.safetensors")
    redux: Path  # FluxPriorReduxPipeline.from_pretrained(redux, text_encoder=..., ...) (FLUX.1-Redux-dev layout)


def ensure_embedded_model(cache_dir: Path) -> EmbeddedModelPaths:
    """Build once into cache_dir/<versioned name>, reuse afterwards.

    Safe when several processes call it at once.

    The first caller takes an exclusive ``flock`` on a lock file in ``cache_dir``, builds into a
    temporary sibling folder, writes a completion marker and renames the folder into place.
    Concurrent callers block on the lock and then find the finished folder.  A folder without
    the marker (crash, manual copy) is never used: it is moved aside and rebuilt.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / _FOLDER_NAME

    if _is_complete(target):  # fast path: a complete folder only ever appears by atomic rename
        logger.debug("embedded model found at %s", target)
        return _paths(target)

    with _exclusive_lock(cache_dir / f".{_FOLDER_NAME}.lock"):
        if _is_complete(target):  # another process built it while we waited
            logger.info("embedded model built by another process, reusing %s", target)
            return _paths(target)
        _remove_leftovers(cache_dir, target)
        tmp = Path(tempfile.mkdtemp(prefix=_BUILDING_PREFIX, dir=cache_dir))
        try:
            started = time.monotonic()
            logger.info("building embedded FLUX model v%s into %s", EMBEDDED_MODEL_VERSION, target)
            _build(tmp)
            elapsed = time.monotonic() - started
            _write_marker(tmp, elapsed)
            _make_world_readable(tmp)
            os.replace(tmp, target)
            fsync_dir(cache_dir)
            logger.info("embedded model built in %.1f s (%s)", elapsed, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _paths(target)


# --- cache handling -------------------------------------------------------------------------


def _paths(root: Path) -> EmbeddedModelPaths:
    return EmbeddedModelPaths(
        base=root / "base",
        fill=root / "fill",
        controlnet=root / "controlnet",
        loras=root / "loras",
        redux=root / "redux",
    )


def _is_complete(root: Path) -> bool:
    marker = root / _MARKER_NAME
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("version") == EMBEDDED_MODEL_VERSION


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish building the embedded model (%s)", lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _remove_leftovers(cache_dir: Path, target: Path) -> None:
    """Called under the lock: any build folder present now belongs to a process that died."""
    for leftover in cache_dir.iterdir():
        if leftover.name.startswith((_BUILDING_PREFIX, _STALE_PREFIX)):
            logger.warning("removing leftover embedded-model folder %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=_STALE_PREFIX, dir=cache_dir))
        logger.warning("embedded model at %s is incomplete; rebuilding it", target)
        os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)


def _write_marker(root: Path, build_seconds: float) -> None:
    import diffusers
    import torch
    import transformers

    payload = {
        "version": EMBEDDED_MODEL_VERSION,
        "seed": _SEED,
        "build_seconds": round(build_seconds, 3),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    marker = root / _MARKER_NAME
    with open(marker, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _make_world_readable(root: Path) -> None:
    """mkdtemp makes folders 0700 and safetensors writes files 0600; workers may run as other users."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


# --- building -------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(component: str) -> Iterator[None]:
    """Seed torch for one component, float32 default dtype, without disturbing the caller's RNG."""
    import torch

    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED + _SEED_OFFSETS[component])
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


@contextlib.contextmanager
def quiet_build() -> Iterator[None]:
    """Hide library noise that means nothing for a locally built model.

    * transformers' "Writing model shards" tqdm bar on every ``save_pretrained``;
    * diffusers' FutureWarning that ``FluxControlNetModel`` still imports the deprecated
      ``diffusers.models.embeddings.FluxPosEmbed`` (internal to diffusers 0.42).
    """
    from transformers.utils import logging as transformers_logging

    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    if bars_were_enabled:
        transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
            yield
    finally:
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()


def _build(root: Path) -> None:
    with quiet_build():
        _build_components(root)


def _build_components(root: Path) -> None:
    from diffusers import FluxPipeline

    with tempfile.TemporaryDirectory(prefix="genserve-embedded-tok-") as scratch:
        tokenizer = make_clip_tokenizer(Path(scratch))
    tokenizer_2 = make_t5_tokenizer()

    with _seeded("text_encoder"):
        text_encoder = _make_clip_text_encoder(tokenizer)
    with _seeded("text_encoder_2"):
        text_encoder_2 = _make_t5_encoder(tokenizer_2)
    with _seeded("vae"):
        vae = _make_vae()
    with _seeded("transformer"):
        transformer = _make_transformer(in_channels=_PACKED_CHANNELS, out_channels=None)
    with _seeded("fill_transformer"):
        fill_transformer = _make_transformer(in_channels=_FILL_IN_CHANNELS, out_channels=_PACKED_CHANNELS)
    with _seeded("controlnet"):
        controlnet = _make_controlnet()

    pipe = FluxPipeline(
        scheduler=make_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(root / "base", safe_serialization=True)
    fill_transformer.save_pretrained(root / "fill" / "transformer", safe_serialization=True)
    controlnet.save_pretrained(root / "controlnet", safe_serialization=True)
    for name in EMBEDDED_LORAS:
        with _seeded(f"lora_{name}"):
            _save_lora(_make_lora(transformer, name), root / "loras" / f"{name}.safetensors", name)
    _save_redux(_make_redux(), root / "redux")


def _save_redux(redux: FluxPriorReduxPipeline, folder: Path) -> None:
    redux.save_pretrained(folder, safe_serialization=True)
    # Without torchvision transformers v5 hands out (and diffusers records) SiglipImageProcessorPil; the real
    # repository names SiglipImageProcessor, which loads as either backend, so the file says that whatever is installed.
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["feature_extractor"] = ["transformers", "SiglipImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _make_redux() -> FluxPriorReduxPipeline:
    """FLUX.1-Redux-dev's components, tiny: SigLIP vision tower, its image processor, the Redux embedder.

    Saved without text encoders (model_index.json names them null, as the real repository does)."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=_SIGLIP_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_channels=3,
        image_size=_SIGLIP_IMAGE_SIZE,
        patch_size=_SIGLIP_PATCH_SIZE,
        hidden_act="gelu_pytorch_tanh",  # SigLIP so400m
        layer_norm_eps=1e-6,
    )
    with _seeded("redux_image_encoder"):
        image_encoder = SiglipVisionModel(config).eval()
    with _seeded("redux_image_embedder"):
        image_embedder = ReduxImageEncoder(redux_dim=_SIGLIP_HIDDEN, txt_in_features=_T5_D_MODEL).eval()
    # FLUX.1-Redux-dev's feature_extractor/preprocessor_config.json, at the tiny size.
    feature_extractor = SiglipImageProcessor(
        do_resize=True,
        size={"height": _SIGLIP_IMAGE_SIZE, "width": _SIGLIP_IMAGE_SIZE},
        resample=3,  # bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return FluxPriorReduxPipeline(
        image_encoder=image_encoder, feature_extractor=feature_extractor, image_embedder=image_embedder
    )


def _make_lora(transformer: FluxTransformer2DModel, name: str) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA in diffusers/PEFT naming (transformer.<module>.lora_A/lora_B.weight), lora_B not zero."""
    import torch

    modules = dict(transformer.named_modules())
    targets = [
        f"transformer_blocks.{index}.{suffix}"
        for index in range(len(transformer.transformer_blocks))
        for suffix in _LORA_DOUBLE_TARGETS
    ]
    targets += [
        f"single_transformer_blocks.{index}.{suffix}"
        for index in range(len(transformer.single_transformer_blocks))
        for suffix in _LORA_SINGLE_TARGETS[name]
    ]
    tensors: dict[str, torch.Tensor] = {}
    for target in targets:
        linear = modules[target]
        assert isinstance(linear, torch.nn.Linear), target
        down = torch.randn(_LORA_RANK, linear.in_features) / linear.in_features**0.5
        up = torch.randn(linear.out_features, _LORA_RANK) * (_LORA_B_SCALE / _LORA_RANK**0.5)
        tensors[f"transformer.{target}.lora_A.weight"] = down.contiguous()
        tensors[f"transformer.{target}.lora_B.weight"] = up.contiguous()
    return tensors


def _save_lora(tensors: dict[str, torch.Tensor], path: Path, name: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "genserve_embedded_lora": name, "rank": str(_LORA_RANK)}
    save_file(tensors, str(path), metadata=metadata)


def make_clip_tokenizer(scratch: Path) -> PreTrainedTokenizerBase:
    """Byte-level BPE vocabulary: the 256 byte symbols, their ``</w>`` variants, no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    # Real CLIP puts the special tokens last (49406, 49407); keep that order.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (scratch / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (scratch / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer: PreTrainedTokenizerBase = CLIPTokenizer.from_pretrained(
        str(scratch),
        model_max_length=_CLIP_MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    return tokenizer


def make_t5_tokenizer() -> PreTrainedTokenizerBase:
    """SentencePiece-like Unigram vocabulary over printable ASCII; no sentinel (extra_id) tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # T5 layout: <pad>=0, </s>=1, <unk>=2, then the pieces.
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces.append(("\u2581" + char, -3.0))
        pieces.append((char, -4.0))
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    # In transformers v5 T5TokenizerFast is an alias of the tokenizers-backed T5Tokenizer.
    tokenizer: PreTrainedTokenizerBase = T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=_T5_MAX_LENGTH,
    )
    return tokenizer


def _make_clip_text_encoder(tokenizer: PreTrainedTokenizerBase) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=64,
        projection_dim=_CLIP_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # != 2, so pooling picks the first EOS position
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _make_t5_encoder(tokenizer: PreTrainedTokenizerBase) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, like FLUX's t5-v1_1-xxl
        dropout_rate=0.0,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _make_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    blocks = len(_VAE_BLOCK_OUT_CHANNELS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=_VAE_NORM_GROUPS,
        sample_size=1024,
        scaling_factor=0.3611,  # FLUX.1-dev
        shift_factor=0.1159,  # FLUX.1-dev
        use_quant_conv=False,
        use_post_quant_conv=False,
        # No self-attention in the mid block: at 1024x1024 it would attend over 16k latent pixels.
        mid_block_add_attention=False,
    ).eval()


def _make_transformer(in_channels: int, out_channels: int | None) -> FluxTransformer2DModel:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(in_channels=in_channels, out_channels=out_channels, **_TRANSFORMER_SHAPE).eval()


def _make_controlnet() -> FluxControlNetModel:
    from diffusers import FluxControlNetModel

    return FluxControlNetModel(
        in_channels=_PACKED_CHANNELS,
        num_mode=_CONTROLNET_NUM_MODE,
        conditioning_embedding_channels=None,  # InstantX-style: control image goes through the VAE
        **_TRANSFORMER_SHAPE,
    ).eval()


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)
