"""The LoRA catalogue (genserve.loras) against the embedded model's real folders, and the embedded LoRAs loaded by
diffusers itself (the code a worker will use)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from genserve.config import Config
from genserve.errors import BadRequest, NotFound, PayloadTooLarge
from genserve.loras import LoraCatalogue, LoraExists, LoraFileError, ModelFolders, served_folders, validate_name

STYLE_TARGETS = [f"transformer_blocks.0.attn.{name}" for name in ("to_k", "to_out.0", "to_q", "to_v")]


@pytest.fixture(scope="module")
def folders(embedded_cache: Path) -> ModelFolders:
    return served_folders(Config.model_validate({"model": {"embedded_cache_dir": str(embedded_cache)}}))


@pytest.fixture
def catalogue(folders: ModelFolders, tmp_path: Path) -> LoraCatalogue:
    return LoraCatalogue(tmp_path / "loras", 1024 * 1024, folders=folders)


def embedded_bytes(folders: ModelFolders, name: str = "embedded-style") -> bytes:
    assert folders.embedded_loras is not None
    return (folders.embedded_loras / f"{name}.safetensors").read_bytes()


def embedded_tensors(folders: ModelFolders, name: str = "embedded-style") -> dict[str, torch.Tensor]:
    assert folders.embedded_loras is not None
    return load_file(str(folders.embedded_loras / f"{name}.safetensors"))


def as_bytes(tensors: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    path = tmp_path / "scratch.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path.read_bytes()


def leftovers(catalogue: LoraCatalogue) -> list[str]:
    return sorted(path.name for path in catalogue.directory.iterdir()) if catalogue.directory.exists() else []


# --- listing -------------------------------------------------------------------------------------------------------


def test_the_embedded_loras_are_listed_with_rank_format_and_targets(catalogue: LoraCatalogue) -> None:
    listed = {info.name: info for info in catalogue.list()}
    assert sorted(listed) == ["embedded-detail", "embedded-style"]
    style, detail = listed["embedded-style"], listed["embedded-detail"]
    for info in (style, detail):
        assert info.rank == 4 and info.format == "diffusers" and info.embedded
        assert info.fits_transformer and info.fits_fill and info.problem is None
        assert 4000 < info.bytes < 10000
    assert list(style.target_modules) == STYLE_TARGETS
    assert list(detail.target_modules) == sorted([*STYLE_TARGETS, "single_transformer_blocks.0.proj_mlp"])
    body = style.to_json()
    assert body["target_module_count"] == 4 and body["fits"] == {"transformer": True, "fill": True}
    assert "path" not in body


def test_a_listing_reads_each_file_once(catalogue: LoraCatalogue, monkeypatch: pytest.MonkeyPatch) -> None:
    import genserve.loras as loras

    calls: list[Path] = []
    real = loras.parse_lora_file
    monkeypatch.setattr(loras, "parse_lora_file", lambda path: calls.append(path) or real(path))
    catalogue.list()
    catalogue.list()
    catalogue.get("embedded-style")
    assert len(calls) == 2


def test_get_names_what_exists(catalogue: LoraCatalogue) -> None:
    assert catalogue.get("embedded-style").rank == 4
    with pytest.raises(NotFound, match="available: embedded-detail, embedded-style"):
        catalogue.get("nope")


# --- formats -------------------------------------------------------------------------------------------------------


def test_a_kohya_lora_is_converted_to_diffusers_names(catalogue: LoraCatalogue, folders: ModelFolders, tmp_path: Path):
    """The embedded LoRA rewritten the way kohya's sd-scripts saves FLUX LoRAs: q, k and v in one fused qkv pair
    (down stacked, up block-diagonal, which diffusers' converter splits back exactly)."""
    style = embedded_tensors(folders)

    def pair(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return style[f"transformer.{module}.lora_A.weight"], style[f"transformer.{module}.lora_B.weight"]

    downs, ups = zip(*(pair(f"transformer_blocks.0.attn.{name}") for name in ("to_q", "to_k", "to_v")), strict=True)
    kohya = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.cat(downs),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.block_diag(*ups),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(12.0),
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": pair("transformer_blocks.0.attn.to_out.0")[0],
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": pair("transformer_blocks.0.attn.to_out.0")[1],
    }
    info = catalogue.add("kohya-style", as_bytes(kohya, tmp_path))
    assert info.format == "kohya"
    assert info.rank == 12  # the file's own (fused) rank; diffusers splits it into three rank-4 pairs
    assert list(info.target_modules) == STYLE_TARGETS and info.fits_transformer and info.fits_fill

    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    converted = FluxLoraLoaderMixin.lora_state_dict(load_file(str(info.path)))
    assert sorted(converted) == sorted(style)
    for key, value in style.items():
        assert torch.equal(converted[key], value), key


def test_a_lora_on_the_input_projection_fits_the_base_but_not_fill(catalogue: LoraCatalogue, tmp_path: Path) -> None:
    x_embedder = {
        "transformer.x_embedder.lora_A.weight": torch.randn(4, 64),  # base in_channels 64; Fill's are 384
        "transformer.x_embedder.lora_B.weight": torch.randn(32, 4),
    }
    info = catalogue.add("x-embedder", as_bytes(x_embedder, tmp_path))
    assert info.fits_transformer and not info.fits_fill


# --- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "-dash", "with space", "x" * 129, "é"])
def test_bad_names_are_refused(catalogue: LoraCatalogue, folders: ModelFolders, name: str) -> None:
    with pytest.raises(BadRequest, match="invalid LoRA name"):
        catalogue.add(name, embedded_bytes(folders))
    assert leftovers(catalogue) == []


def test_good_names_pass_and_the_extension_is_dropped() -> None:
    assert validate_name("My_LoRA-v1.2") == "My_LoRA-v1.2"
    assert validate_name("style.safetensors") == "style"


def test_a_file_that_is_not_safetensors_is_refused_clearly(catalogue: LoraCatalogue) -> None:
    with pytest.raises(LoraFileError, match="'junk' was not added: not a safetensors file"):
        catalogue.add("junk", b"\x00" * 8 + b"definitely not a safetensors header")
    assert leftovers(catalogue) == []


def test_a_safetensors_file_without_lora_weights_is_refused_clearly(catalogue: LoraCatalogue, tmp_path: Path) -> None:
    model = {"transformer_blocks.0.attn.to_q.weight": torch.randn(32, 32)}
    with pytest.raises(LoraFileError, match="holds no LoRA weights"):
        catalogue.add("full-model", as_bytes(model, tmp_path))


def test_a_lora_for_another_model_does_not_fit(catalogue: LoraCatalogue, tmp_path: Path) -> None:
    wider = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),  # real FLUX.1-dev width
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 4),
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.randn(4, 32),  # a block it does not have
        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.randn(32, 4),
    }
    with pytest.raises(LoraFileError, match="does not fit the base transformer") as info:
        catalogue.add("flux-dev-lora", as_bytes(wider, tmp_path))
    assert "transformer_blocks.0.attn.to_q is 32→32 in the base transformer, the LoRA's is 3072→3072" in str(info.value)
    assert "transformer_blocks.7.attn.to_q is not a linear layer" in str(info.value)
    assert leftovers(catalogue) == []


def test_an_upload_over_the_cap_is_413(folders: ModelFolders, tmp_path: Path) -> None:
    small = LoraCatalogue(tmp_path / "loras", 1000, folders=folders)
    with pytest.raises(PayloadTooLarge, match="loras.max_upload_mb"):
        small.add("big", embedded_bytes(folders))


# --- add and remove ------------------------------------------------------------------------------------------------


def test_add_conflict_overwrite_and_remove(catalogue: LoraCatalogue, folders: ModelFolders) -> None:
    style, detail = embedded_bytes(folders), embedded_bytes(folders, "embedded-detail")
    added = catalogue.add("mine", style)
    assert added.path == catalogue.directory / "mine.safetensors" and added.path.read_bytes() == style
    assert not added.embedded and "mine" in [info.name for info in catalogue.list()]
    with pytest.raises(LoraExists, match="already exists"):
        catalogue.add("mine", detail)
    with pytest.raises(LoraExists):
        catalogue.add("embedded-style", style)  # an embedded name is taken too
    with pytest.raises(LoraFileError):
        catalogue.add("mine", b"garbage", overwrite=True)
    assert added.path.read_bytes() == style  # a refused overwrite leaves the old file whole
    replaced = catalogue.add("mine", detail, overwrite=True)
    assert replaced.path.read_bytes() == detail and len(replaced.target_modules) == 5
    assert catalogue.get("mine").target_modules == replaced.target_modules  # the cache follows the new file
    assert leftovers(catalogue) == ["mine.safetensors"]  # no temp file left behind
    catalogue.remove("mine")
    assert leftovers(catalogue) == []
    with pytest.raises(NotFound):
        catalogue.remove("mine")
    with pytest.raises(BadRequest, match="cannot be deleted"):
        catalogue.remove("embedded-style")


def test_a_real_model_lists_no_embedded_loras(tmp_path: Path) -> None:
    config = Config.model_validate({"model": {"path": str(tmp_path / "flux")}, "fill": {"path": ""}})
    folders = served_folders(config)
    assert folders.embedded_loras is None and folders.fill is None
    assert folders.transformer == tmp_path / "flux" / "transformer"


# --- diffusers loads them ------------------------------------------------------------------------------------------


def test_the_embedded_loras_load_in_diffusers_and_change_the_image(folders: ModelFolders) -> None:
    from diffusers import FluxPipeline

    assert folders.embedded_loras is not None
    pipe = FluxPipeline.from_pretrained(str(folders.transformer.parent))

    def image() -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        out = pipe("a lamp", width=64, height=64, num_inference_steps=2, generator=generator, output_type="pt")
        return out.images[0]

    base = image()
    for name in ("embedded-style", "embedded-detail"):
        pipe.load_lora_weights(str(folders.embedded_loras / f"{name}.safetensors"), adapter_name=name)
    pipe.set_adapters(["embedded-style"], adapter_weights=[0.0])
    assert torch.equal(image(), base)  # weight 0 is the base image, bit for bit
    for name in ("embedded-style", "embedded-detail"):
        pipe.set_adapters([name], adapter_weights=[1.0])
        changed = image()
        assert torch.isfinite(changed).all()
        difference = (changed - base).abs().mean().item()
        print(f"{name}: mean |image(weight 1) - image(weight 0)| = {difference:.4f} (pixels in [0, 1])")
        assert difference > 0.01, name
