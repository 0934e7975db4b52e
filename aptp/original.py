"""The authors' APTP artifacts (rezashkv/diffusion_pruning), read as ours (formats: ../shared/APTP_ORIGINAL_FORMATS.md).

Two folder kinds of theirs are recognised by their files, wherever a stage takes a pruning directory:

- a pruning checkpoint ``<run>/checkpoint-N/``: ``hypernet/`` and ``quantizer/`` (diffusers ``save_pretrained``
  folders), optionally ``quantizer_embeddings.pt`` and the dense ``unet/``; the run's ``config.yaml`` one level up;
- a released variant (``rezashkv/diffusion_pruning/APTP-Base-CC3M`` ...): ``hypernet/``, ``quantizer/`` and the
  fine-tuned experts ``arch<k>/checkpoint-N/{unet/, arch_vector.pt}``.

The router: the predictor is the hypernet's ``mh_fc.0..70`` layers concatenated in layout order (weights and biases),
the codebook the quantizer's ``embedding.weight`` logits, and expert k's architecture its ``embedding_gs[k]`` (the
Gumbel-sigmoid sample the released experts were built from, kept iff >= 0.5), not a threshold of the logits. The
sampled values stay in ``Router.soft_codes`` for the authors' routing rule (``routing="authors"``).

An expert of theirs (``arch<k>/checkpoint-N/``): ``arch_vector.pt`` thresholded at 0.5 gives the code; the stock
diffusers ``UNet2DConditionModel`` is built from their config with the stock block names, sliced by the code
(``aptp.expert.materialize``: the same shapes and key names as their pruned UNet) and loaded strictly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from diffcompress.checkpoint import CheckpointError, check_weights, load_file, load_tensor
from diffcompress.errors import UserError

from .layout import ArchLayout, meta_unet
from .router import DEFAULT_ENCODER, Router, _hub_reachable

HYPERNET, QUANTIZER, EMBEDDINGS = "hypernet", "quantizer", "quantizer_embeddings.pt"
WEIGHTS_NAME, CONFIG_NAME, ARCH_VECTOR = "diffusion_pytorch_model.safetensors", "config.json", "arch_vector.pt"
DEFAULT_SD = "stabilityai/stable-diffusion-2-1"  # their --pretrained_model_name_or_path default
HUB_REPO, HUB_STEP = "rezashkv/diffusion_pruning", 30000  # the released experts are checkpoint-30000
VARIANTS = ("APTP-Base-CC3M", "APTP-Small-CC3M", "APTP-Base-COCO", "APTP-Small-COCO")
DEFAULT_RESOLUTION = 256  # model.unet.resolution of their configs: the MACs of experts.json are counted there
# their gated block classes -> the stock diffusers blocks they extend (same modules and key names)
STOCK_BLOCKS = {
    "CrossAttnDownBlock2DHalfGated": "CrossAttnDownBlock2D",
    "DownBlock2DHalfGated": "DownBlock2D",
    "UNetMidBlock2DCrossAttnWidthGated": "UNetMidBlock2DCrossAttn",
    "UpBlock2DHalfGated": "UpBlock2D",
    "CrossAttnUpBlock2DHalfGated": "CrossAttnUpBlock2D",
}
GATED_EXTRAS = ("gated_ff", "ff_gate_width")


# ----------------------------------------------------------------------------------------------------
# Recognising their folders


def is_authors_pruning_dir(path: str | os.PathLike) -> bool:
    """A pruning checkpoint or released variant of theirs (``hypernet/`` + ``quantizer/``) that is not ours."""
    p = Path(path)
    return (p / HYPERNET).is_dir() and (p / QUANTIZER).is_dir() and not (p / "router.json").is_file()


def is_authors_expert(path: str | os.PathLike) -> bool:
    """An expert of theirs: ``unet/`` (or the folder itself is ``unet/``) with ``arch_vector.pt`` beside it."""
    p = Path(path)
    return (p / "unet" / CONFIG_NAME).is_file() or (p.name == "unet" and (p.parent / ARCH_VECTOR).is_file())


def run_config(path: str | os.PathLike) -> tuple[Path | None, dict[str, Any]]:
    """Their run's ``config.yaml`` (beside the checkpoint folder or in it) and its content (empty when absent)."""
    import yaml

    for candidate in (Path(path) / "config.yaml", Path(path).parent / "config.yaml"):
        if candidate.is_file():
            try:
                data = yaml.safe_load(candidate.read_text())
            except yaml.YAMLError as e:
                raise UserError(f"{candidate}: not valid YAML ({str(e).splitlines()[0]})") from None
            return candidate, data if isinstance(data, dict) else {}
    return None, {}


def _get(data: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, Mapping) or key not in data:
            return default
        data = data[key]
    return data


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (expected the authors' {path.parent.name}/ folder layout)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers save_pretrained folder's weights (safetensors, else the .bin pickle, read without running code)."""
    for name in (WEIGHTS_NAME, "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return load_file(folder / name)
    raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")


# ----------------------------------------------------------------------------------------------------
# The router: hypernet + quantizer


def stock_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Their (gated or pruned) UNet config with the stock diffusers class and block names, without their extras."""
    out = {k: v for k, v in config.items() if k not in GATED_EXTRAS and not k.startswith("_")}
    out["down_block_types"] = [STOCK_BLOCKS.get(b, b) for b in config["down_block_types"]]
    out["up_block_types"] = [STOCK_BLOCKS.get(b, b) for b in config["up_block_types"]]
    out["mid_block_type"] = STOCK_BLOCKS.get(config.get("mid_block_type"), config.get("mid_block_type"))
    return out


def expert_dirs(path: str | os.PathLike) -> dict[int, Path]:
    """Expert id -> its latest ``arch<k>/checkpoint-N`` folder under a released variant folder."""
    found: dict[int, Path] = {}
    for arch in Path(path).glob("arch*"):
        m = re.fullmatch(r"arch(\d+)", arch.name)
        steps = [
            (int(c.name.split("-")[1]), c) for c in arch.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", c.name)
        ]
        if m and steps:
            found[int(m.group(1))] = max(steps)[1]
    return dict(sorted(found.items()))


def unet_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The stock UNet config their folder holds (the dense ``unet/`` or the first expert's), if any."""
    p = Path(path)
    candidates = [p / "unet" / CONFIG_NAME] + [d / "unet" / CONFIG_NAME for d in expert_dirs(p).values()]
    for c in candidates:
        if c.is_file():
            return stock_unet_config(_read_json(c))
    return None


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """What ``router.json`` says for one of ours: the SD model and prompt encoder (their run's config.yaml, where
    their command-line flags are merged in, else their defaults), sizes, depth order and the expert rule."""
    p = Path(path)
    hyper, quant = _read_json(p / HYPERNET / CONFIG_NAME), _read_json(p / QUANTIZER / CONFIG_NAME)
    _, cfg = run_config(p)
    layout_size = _structure_size(hyper.get("structure"), p / HYPERNET / CONFIG_NAME)
    return dict(
        pretrained_model_name_or_path=cfg.get("pretrained_model_name_or_path") or DEFAULT_SD,
        prompt_encoder=cfg.get("prompt_encoder_model_name_or_path") or DEFAULT_ENCODER,
        prompt_dim=int(hyper.get("input_dim", 768)), num_experts=int(quant["n_e"]), layout_size=layout_size,
        resolution=int(_get(cfg, "model.unet.resolution", DEFAULT_RESOLUTION)),
        budget=_get(cfg, "training.losses.resource_loss.pruning_target"), target=None,
        depth_order=quant.get("depth_order"), assignment="argmax", expert_threshold="sample",
        optimal_transport=bool(quant.get("optimal_transport", True)), authors=str(p),
    )  # fmt: skip


def _structure_size(structure: Any, where: Path) -> int:
    """Entries of the architecture vector by their ``structure`` {width: [[32], [5, 5, 32], ...], depth: [[0], [1]]}."""
    try:
        return sum(sum(w) for w in structure["width"]) + sum(sum(d) for d in structure["depth"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: no readable 'structure' (width / depth lists): {e}") from None


def _depth_order(raw: Any, layout: ArchLayout, where: Path) -> list[int] | None:
    if raw is None:
        return None
    order = [int(d) % layout.depth_size for d in raw]
    if sorted(order) != list(range(layout.depth_size)):
        raise CheckpointError(f"{where}: depth_order {raw} is not a permutation of the {layout.depth_size} depth gates")
    return order


def read_sampled_codes(path: str | os.PathLike, num_experts: int, size: int) -> torch.Tensor:
    """The experts' sampled architectures [K, size]: ``quantizer_embeddings.pt`` if there, else the quantizer's
    ``embedding_gs``."""
    p = Path(path)
    if (p / EMBEDDINGS).is_file():
        where, codes = p / EMBEDDINGS, load_tensor(p / EMBEDDINGS)
    else:
        where, codes = p / QUANTIZER / WEIGHTS_NAME, _weights(p / QUANTIZER).get("embedding_gs")
    if not isinstance(codes, torch.Tensor) or tuple(codes.shape) != (num_experts, size):
        got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise CheckpointError(
            f"{where}: expected the experts' embedding_gs of shape ({num_experts}, {size}), got {got}"
        )
    check_weights({"embedding_gs": codes}, str(where))
    return codes.detach().float().clone()


def hard_codes(vectors: torch.Tensor, layout: ArchLayout, where: str | os.PathLike) -> torch.Tensor:
    """Their expert masks: kept iff >= 0.5 (int64 0/1 [..., size]); a kept block with an empty sub-gate is refused."""
    codes = (vectors >= 0.5).long()
    for sg in layout.subgates:
        alive = torch.ones(codes.shape[:-1], dtype=torch.bool)
        if sg.depth_index is not None:
            alive = codes[..., layout.width_size + sg.depth_index].bool()
        if (alive & (codes[..., sg.start : sg.stop].sum(-1) == 0)).any():
            raise CheckpointError(
                f"{where}: an architecture keeps nothing of {sg.name} ({sg.kind}): not a mask of theirs"
            )
    return codes


def read_router(path: str | os.PathLike, layout: ArchLayout) -> Router:
    """The router of their pruning checkpoint or released variant, with its experts' codes (see the module doc)."""
    p = Path(path)
    info = read_info(p)
    if info["layout_size"] != layout.size:
        raise UserError(f"{p}: the hypernet was trained for {info['layout_size']} gates, this UNet has {layout.size}")
    hyper_cfg = _read_json(p / HYPERNET / CONFIG_NAME)
    order = _depth_order(info["depth_order"], layout, p / QUANTIZER / CONFIG_NAME)
    router = Router(layout, info["prompt_dim"], info["num_experts"], order=order, expert_threshold="sample")
    hyper, where = _weights(p / HYPERNET), p / HYPERNET / WEIGHTS_NAME
    if hyper_cfg.get("single_arch_param"):  # the single-architecture baseline: one learned vector, no predictor
        weight = torch.zeros(layout.size, info["prompt_dim"])
        bias = _tensor(hyper, "arch", (1, layout.size), where).flatten()
    else:
        sizes = [sg.size for sg in layout.subgates] + [layout.depth_size]
        weight = torch.cat(
            [_tensor(hyper, f"mh_fc.{i}.weight", (n, info["prompt_dim"]), where) for i, n in enumerate(sizes)]
        )
        bias = torch.cat([_tensor(hyper, f"mh_fc.{i}.bias", (n,), where) for i, n in enumerate(sizes)])
        extra = sorted(set(hyper) - {f"mh_fc.{i}.{w}" for i in range(len(sizes)) for w in ("weight", "bias")})
        if extra:
            raise CheckpointError(f"{where}: unexpected tensors {extra[:4]} (weight-normalised hypernets are not read)")
    quant = _weights(p / QUANTIZER)
    logits = _tensor(quant, "embedding.weight", (info["num_experts"], layout.size), p / QUANTIZER / WEIGHTS_NAME)
    soft = read_sampled_codes(p, info["num_experts"], layout.size)
    state = {"predictor.weight": weight.float(), "predictor.bias": bias.float(), "codebook": logits.float()}
    router.load_state_dict(state, strict=True)
    router.soft_codes = soft
    router.fixed_codes = hard_codes(soft, layout, p).float()
    return router


def _tensor(state: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], where: Path) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{where}: no tensor {key!r} (expected the authors' hypernet/quantizer key names)")
    if tuple(state[key].shape) != shape:
        raise CheckpointError(f"{where}: {key} has shape {tuple(state[key].shape)}, this UNet's layout needs {shape}")
    check_weights({key: state[key]}, str(where))
    return state[key]


# ----------------------------------------------------------------------------------------------------
# Experts: arch<k>/checkpoint-N/{unet/, arch_vector.pt}


def _expert_parts(path: Path) -> tuple[Path, Path]:
    """(unet folder, arch_vector.pt) of an expert folder: ``checkpoint-N/``, its ``unet/``, or ``arch<k>/``."""
    if path.name == "unet":
        path = path.parent
    elif not (path / "unet").is_dir():
        steps = [c for c in path.glob("checkpoint-*") if (c / "unet").is_dir()]
        if steps:
            path = max(steps, key=lambda c: int(c.name.split("-")[1]) if c.name.split("-")[1].isdigit() else -1)
    unet, vector = path / "unet", path / ARCH_VECTOR
    for needed in (unet / CONFIG_NAME, vector):
        if not needed.is_file():
            raise CheckpointError(
                f"expert folder {str(path)!r} has no {needed.relative_to(path)} (the authors' layout)"
            )
    return unet, vector


def read_arch_vector(path: str | os.PathLike, size: int) -> torch.Tensor:
    """``arch_vector.pt`` as a [size] tensor of its own (theirs is saved as a view of all K codes: cloned)."""
    vector = load_tensor(path)
    check_weights({"arch_vector": vector}, str(path))
    if vector.numel() != size:
        raise CheckpointError(f"{path}: expected an architecture vector of {size} entries, got {tuple(vector.shape)}")
    return vector.detach().float().flatten().clone()


def load_authors_expert(path: str | os.PathLike) -> tuple[UNet2DConditionModel, torch.Tensor]:
    """Their fine-tuned / released expert as a stock ``UNet2DConditionModel`` (eval) and its binary code."""
    from .expert import _misfit, materialize

    unet_dir, vector_file = _expert_parts(Path(path))
    config = stock_unet_config(_read_json(unet_dir / CONFIG_NAME))
    layout = ArchLayout.from_config(config)
    code = hard_codes(read_arch_vector(vector_file, layout.size), layout, vector_file)
    expert = materialize(meta_unet(config), code, layout, inplace=True)
    state = _weights(unet_dir)
    if problems := _misfit(expert, state):
        raise CheckpointError(f"{unet_dir / WEIGHTS_NAME} does not fit {vector_file}: {problems}")
    check_weights(state, str(unet_dir / WEIGHTS_NAME), expert.state_dict())
    expert.load_state_dict(state, strict=True, assign=True)
    return expert.eval(), code


def load_expert_folder(path: str | os.PathLike) -> tuple[UNet2DConditionModel, torch.Tensor]:
    """An expert folder of ours (``aptp.expert.save_expert``) or of the authors' (``arch<k>/checkpoint-N``)."""
    from .expert import WEIGHTS, load_expert

    p = Path(path)
    if (p / WEIGHTS).is_file() or not (is_authors_expert(p) or any(p.glob("checkpoint-*/unet"))):
        return load_expert(p)
    return load_authors_expert(p)


# ----------------------------------------------------------------------------------------------------
# The hub: rezashkv/diffusion_pruning/<variant>


def hub_files(variant: str, experts: range | None = None, step: int = HUB_STEP) -> list[str]:
    """The files of a released variant, as the hub lays them out: the router's (``experts`` None) or the experts'."""
    if experts is None:
        return [f"{variant}/{part}/{name}" for part in (HYPERNET, QUANTIZER) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    return [
        f"{variant}/arch{k}/checkpoint-{step}/{name}"
        for k in experts
        for name in (ARCH_VECTOR, f"unet/{CONFIG_NAME}", f"unet/{WEIGHTS_NAME}")
    ]


def fetch(
    repo_id: str, files: list[str], revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Download ``files`` of ``repo_id`` into the hub cache (offline: from the cache only) and return the snapshot
    folder; a file that cannot be had is one line naming every missing file and how to get them."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = not _hub_reachable()
    missing, root = [], None
    for name in files:
        try:
            local = huggingface_hub.hf_hub_download(
                repo_id, name, revision=revision, cache_dir=cache_dir, local_files_only=offline
            )
            root = Path(local).parents[len(Path(name).parts) - 1]
        except (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError, OSError):
            missing.append(name)
    if missing:
        where = "not in the hub cache and the hub cannot be reached" if offline else "not found on the hub"
        folder = f"models/{repo_id.split('/')[-1]}"
        listed = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        include = " ".join(f"--include {shlex.quote(m)}" for m in missing)
        raise UserError(
            f"{repo_id}: {len(missing)} file(s) {where}: {listed}. On a machine with network run `hf download "
            f"{repo_id} {include} --local-dir {folder}`, copy {folder} here and pass {folder}/<variant> as the source"
        )
    return root


def is_hub_variant(source: str, variant: str | None) -> bool:
    """``source`` names a hub repo (not a local path) and a variant folder is given."""
    return variant is not None and not Path(source).expanduser().exists() and source.count("/") == 1


def fetch_router_files(repo_id: str, variant: str, revision: str | None = None, cache_dir: Any = None) -> Path:
    """The variant's hypernet and quantizer from the hub (cache): its local folder."""
    return fetch(repo_id, hub_files(variant), revision, cache_dir) / variant


def fetch_expert_files(
    repo_id: str, variant: str, expert: int, revision: str | None = None, cache_dir: Any = None, step: int = HUB_STEP
) -> Path:
    """Expert ``expert`` of the variant from the hub (cache): its ``arch<k>/checkpoint-N`` folder."""
    return fetch(repo_id, hub_files(variant, range(expert, expert + 1), step), revision, cache_dir) / (
        f"{variant}/arch{expert}/checkpoint-{step}"
    )
