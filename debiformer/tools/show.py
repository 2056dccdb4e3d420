"""`debiformer show`: what DBRA does on an image, drawn and as raw arrays.

    AttentionCapture   records, for one forward pass, what chosen BRA and DBRA modules compute
    inspect_image      one image through it: top-5 classes, each chosen block's agents, routing
                       and query-to-agent attention, and a Grad-CAM of the top class
    draw_inspection    that as one figure (matplotlib, the `viz` extra)
    show               the command: every image, its figure, the JSON

Coordinates are pixels of the image file, (x, y) from its top-left corner (pixel (i, j) spans
[j, j + 1] x [i, i + 1]). The model sees the image resized; an h x w map of a stage (stride 4, 8,
16, 32) covers the whole image, each of its pixels an (H/h) x (W/w) block of the file's. Each
attention pads its map on the bottom and right to the region grid, so regions and agents may
reach past the image's edge. The region grids, reference points, agent positions and routing
drawn are those the attentions record during the forward pass (`routing.recording`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from rich.console import Console
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from debiformer import runtime
from debiformer.data.images import MAX_IMAGE_PIXELS, read_rgb, unique_stems
from debiformer.errors import UserError
from debiformer.model import BiLevelRoutingAttention
from debiformer.routing import RegionGrid, recording
from debiformer.tools.classifier import Classifier, load_classifier
from debiformer.tools.common import check_at_least
from debiformer.tools.plot import check_figure_path, require_matplotlib, save_figure

TOP_CLASSES = 5
# figure colours: agents per offset group (bright on photographs), BRA's and DBRA's regions
GROUP_COLOURS = (
    "#ffd400",
    "#00e5ff",
    "#ff4fd8",
    "#7dff4f",
    "#ff8c1a",
    "#b088ff",
    "#ffffff",
    "#ff3b3b",
)
BRA_COLOUR = "#ff8c1a"
DBRA_COLOUR = "#00e5ff"

# ----------------------------------------------------------------------------- capture


class AttentionCapture:
    """Within the block, a forward pass through `model` records, for each module of `names` (BRA
    or DBRA), what it hands to `routing.recording`'s recorder: "region_grid" and "region_index",
    and for DBRA "reference_points", "agent_positions", "agent_grid" and "query_agent_attention"
    (tensors detached). The hooks and the recorder exist only inside the block; outside it the
    model keeps and computes nothing for this."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(names)
        self.records: dict[str, dict[str, Any]] = {}
        self._current: str | None = None
        self._stack = ExitStack()

    def __enter__(self) -> AttentionCapture:
        modules = [self.model.get_submodule(name) for name in self.names]
        for name, module in zip(self.names, modules, strict=True):
            pre = module.register_forward_pre_hook(lambda *_, name=name: self._enter(name))
            post = module.register_forward_hook(lambda *_: self._leave())
            self._stack.callback(pre.remove)
            self._stack.callback(post.remove)
        self._stack.enter_context(recording(self._record))
        return self

    def __exit__(self, *exc) -> None:
        self._current = None
        self._stack.close()

    def _enter(self, name: str) -> None:
        """Pre-hook: `name` runs now."""
        self._current = name
        self.records[name] = {}

    def _leave(self) -> None:
        """Forward hook: no recorded module runs any more."""
        self._current = None

    def _record(self, key: str, value: Tensor | RegionGrid) -> None:
        """The recorder: keeps `value` (tensors detached) under `key` while a chosen module runs."""
        if self._current is not None:
            is_tensor = isinstance(value, Tensor)
            self.records[self._current][key] = value.detach() if is_tensor else value


@contextmanager
def last_stage_activation(model: nn.Module) -> Iterator[list[Tensor]]:
    """A list that the block's forward pass fills with the last stage's output (NHWC)."""
    outputs: list[Tensor] = []
    handle = model.stages[-1].register_forward_hook(lambda _, __, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def grad_cam(score: Tensor, activation: Tensor) -> np.ndarray:
    """Grad-CAM: the activation's channels weighted by their mean gradient of `score`, summed,
    negative values cut; (h, w) for an NHWC activation of one image."""
    (gradient,) = torch.autograd.grad(score, activation)
    weights = gradient.mean(dim=(1, 2), keepdim=True)
    return (weights * activation).sum(dim=-1)[0].clamp(min=0).detach().numpy()


# ----------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockChoice:
    """A block of the network: named `S.B` (stage S, its B-th block, from 1), its DBRA
    (`attn2`), its BRA (`attn1`, where that is one) and the stride of its map."""

    name: str
    dbra: str
    bra: str | None
    stride: int


def model_blocks(model: nn.Module) -> list[BlockChoice]:
    """Every block of a DeBiFormer, in depth order."""
    blocks = []
    for stage_index, stage in enumerate(model.stages):
        for block_index, block in enumerate(stage):
            prefix = f"stages.{stage_index}.{block_index}"
            is_bra = isinstance(block.attn1, BiLevelRoutingAttention)
            blocks.append(
                BlockChoice(
                    name=f"{stage_index + 1}.{block_index + 1}",
                    dbra=f"{prefix}.attn2",
                    bra=f"{prefix}.attn1" if is_bra else None,
                    stride=4 * 2**stage_index,
                )
            )
    return blocks


def choose_blocks(model: nn.Module, names: Sequence[str] | None) -> list[BlockChoice]:
    """The blocks `names` ("S.B", or "all"); by default the last block of each stage."""
    blocks = model_blocks(model)
    if not names:
        return list({block.stride: block for block in blocks}.values())
    if list(names) == ["all"]:
        return blocks
    by_name = {block.name: block for block in blocks}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise UserError(
            f": no block {unknown[0]!r} in this model; its blocks (stage.block) are "
            f"{', '.join(by_name)}, or all",
            about="blocks",
        )
    return [by_name[name] for name in dict.fromkeys(names)]


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class MapGeometry:
    """Where an attention's map lies on the image file: `grid`, the region grid the attention
    recorded for it, and `pixel`, the (x, y) size of one map pixel in file pixels."""

    grid: RegionGrid
    pixel: tuple[float, float]

    @classmethod
    def on_image(cls, grid: RegionGrid, image_size: tuple[int, int]) -> MapGeometry:
        """The geometry of a map of `grid` that covers an image of `image_size` (w, h)."""
        height, width = grid.size
        return cls(grid, (image_size[0] / width, image_size[1] / height))

    def pixels_of_normalised(self, points: np.ndarray) -> np.ndarray:
        """grid_sample coordinates (y, x) in [-1, 1] of the padded map (align_corners=True: -1
        and 1 are the centres of its first and last pixels) as file pixels (x, y)."""
        height, width = self.grid.padded_size
        y = ((points[..., 0] + 1) / 2 * (height - 1) + 0.5) * self.pixel[1]
        x = ((points[..., 1] + 1) / 2 * (width - 1) + 0.5) * self.pixel[0]
        return np.stack([x, y], axis=-1)

    def normalised_of_map_pixel(self, row: int, column: int) -> np.ndarray:
        """The grid_sample coordinates (y, x) of the centre of map pixel (row, column)."""
        height, width = self.grid.padded_size
        return np.array([row / max(height - 1, 1), column / max(width - 1, 1)]) * 2 - 1

    def map_pixel(self, point: tuple[float, float]) -> tuple[int, int]:
        """(row, column) of the map pixel over the file pixel `point` (x, y)."""
        column = int(point[0] // self.pixel[0])
        row = int(point[1] // self.pixel[1])
        return min(max(row, 0), self.grid.size[0] - 1), min(max(column, 0), self.grid.size[1] - 1)

    def region_boxes(self) -> np.ndarray:
        """(S², 4) boxes (x0, y0, x1, y1) of the regions in file pixels, in raster order."""
        return self.grid.region_boxes().double().numpy() * np.array([*self.pixel, *self.pixel])


def agent_cell(reference: np.ndarray, point: np.ndarray) -> tuple[int, int]:
    """(row, column) of the agent grid cell that holds `point`: the cell whose reference point,
    of DBRA's (Hk, Wk, 2) `reference`, lies nearest to it in each axis; both (y, x) in [-1, 1]."""
    row = np.abs(reference[:, 0, 0] - point[0]).argmin()
    column = np.abs(reference[0, :, 1] - point[1]).argmin()
    return int(row), int(column)


# ----------------------------------------------------------------------------- images


def model_input(image: Image.Image, size: int | tuple[int, int]) -> Tensor:
    """The image as the model sees it: resized (the shorter side to `size`, or to (h, w)),
    normalised with ImageNet's mean and std as the loaders do; (1, 3, h, w)."""
    if isinstance(size, int):
        scale = size / min(image.size)
        size = (max(1, round(image.height * scale)), max(1, round(image.width * scale)))
    pixels = TF.pil_to_tensor(TF.resize(image, list(size))).float() / 255
    return TF.normalize(pixels, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[None]


# ----------------------------------------------------------------------------- inspection


def inspect_image(
    loaded: Classifier,
    image: Image.Image,
    blocks: Sequence[BlockChoice],
    query: tuple[float, float] | None = None,
    size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """One image through the classifier: its top-5 classes; for each block its agents (reference
    points and sampled positions), the routing of the `query` point (default: the centre) by BRA
    and of the agents around it by DBRA, and the query's attention over the agents; a Grad-CAM of
    the top class on the last stage. Arrays are numpy, positions in file pixels (x, y)."""
    width, height = image.size
    query = query or (width / 2, height / 2)
    if not (0 <= query[0] < width and 0 <= query[1] < height):
        raise UserError(
            f"{query[0]:g},{query[1]:g}: outside the {width}x{height} image (x from 0 to "
            f"{width - 1}, y from 0 to {height - 1})",
            about="query",
        )
    pixels = model_input(image, size or loaded.preprocessing.size)
    names = [name for block in blocks for name in (block.dbra, block.bra) if name]
    with (
        torch.enable_grad(),
        AttentionCapture(loaded.model, names) as capture,
        last_stage_activation(loaded.model) as activations,
    ):
        logits = loaded.model(pixels)[0]
    probabilities = logits.detach().softmax(dim=-1)
    top = probabilities.topk(min(TOP_CLASSES, len(probabilities)))
    best = int(top.indices[0])
    return {
        "image_size": [height, width],
        "input_size": list(pixels.shape[2:]),
        "query": list(query),
        "top_classes": [
            {"index": int(k), "name": loaded.class_names[int(k)], "probability": float(p)}
            for p, k in zip(top.values, top.indices, strict=True)
        ],
        "blocks": {
            block.name: block_view(block, capture.records, query, (width, height))
            for block in blocks
        },
        "grad_cam": {
            "class": loaded.class_names[best],
            "map": grad_cam(logits[best], activations[0]),
        },
    }


def block_view(
    block: BlockChoice,
    records: dict[str, dict[str, Any]],
    query: tuple[float, float],
    image_size: tuple[int, int],
) -> dict[str, Any]:
    """What `inspect_image` shows of one block (see there), read from what its attentions
    recorded (`AttentionCapture`); `image_size` is the file's (w, h)."""
    dbra = records[block.dbra]
    geometry = MapGeometry.on_image(dbra["region_grid"], image_size)
    grid, agent_grid = geometry.grid, dbra["agent_grid"]
    reference = dbra["reference_points"].double().numpy()  # (Hk, Wk, 2)
    positions = dbra["agent_positions"].double().numpy()  # (G, Hk, Wk, 2) for one image
    row, column = geometry.map_pixel(query)
    query_region = int(grid.region_map()[row, column])
    cell = agent_cell(reference, geometry.normalised_of_map_pixel(row, column))
    agent_regions = agent_grid.region_map().numpy()
    agents_region = int(agent_regions[cell])
    agent_routing = dbra["region_index"][0].numpy()
    attention = dbra["query_agent_attention"][0, :, row * grid.padded_size[1] + column]
    view = {
        "dbra": block.dbra,
        "stride": block.stride,
        "map_size": list(grid.size),
        "padded_size": list(grid.padded_size),
        "regions_per_side": grid.regions_per_side,
        "region_boxes": geometry.region_boxes(),
        "query_map_pixel": [row, column],
        "query_region": query_region,
        "agent_reference": geometry.pixels_of_normalised(reference),
        "agent_positions": geometry.pixels_of_normalised(positions),
        "agent_groups": positions.shape[0],
        "agent_cell": list(cell),
        "agent_region": agents_region,
        "agent_region_mask": agent_regions == agents_region,
        "agent_routing": agent_routing,
        "agent_routed_regions": agent_routing[agents_region],
        "query_agent_attention": attention.reshape(-1, *agent_grid.size).double().numpy(),
        "bra": block.bra,
        "bra_routing": None,
        "query_routed_regions": None,
    }
    if block.bra is not None:
        bra_routing = records[block.bra]["region_index"][0].numpy()
        view.update(bra_routing=bra_routing, query_routed_regions=bra_routing[query_region])
    return view


def as_json(value: Any) -> Any:
    """`value` with numpy arrays and scalars as lists and numbers, for `json.dumps`."""
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- the figure


def draw_inspection(view: dict[str, Any], image: Image.Image, title: str, path: Path) -> None:
    """Writes the figure of `inspect_image`'s `view`: the image with its top-5 classes and the
    Grad-CAM in the first column, then per block its agents (top) and the query's routing and
    attention (bottom)."""
    from matplotlib.figure import Figure

    blocks = view["blocks"]
    figure = Figure(figsize=(3.3 * (len(blocks) + 1), 8.0), layout="constrained")
    figure.get_layout_engine().set(h_pad=0.1)
    grid = figure.add_gridspec(2, len(blocks) + 1)
    pixels = np.asarray(image)
    _draw_classes(figure.add_subplot(grid[0, 0]), pixels, view)
    _draw_cam(figure.add_subplot(grid[1, 0]), pixels, view["grad_cam"])
    for column, (name, block) in enumerate(blocks.items(), start=1):
        _draw_agents(figure.add_subplot(grid[0, column]), pixels, name, block)
        _draw_routing(figure.add_subplot(grid[1, column]), pixels, name, block, view["query"])
    _legend(figure)
    figure.suptitle(title)
    save_figure(figure, path, dpi=110)


def _image_axes(axes, pixels: np.ndarray, extent: tuple[float, float] | None = None) -> None:
    """The image on `axes` in file pixel coordinates; the axes reach to `extent` (x, y) when
    that is larger (padded maps), drawn grey beyond the image."""
    height, width = pixels.shape[:2]
    axes.imshow(pixels, extent=(0, width, height, 0), interpolation="nearest")
    right, bottom = extent or (width, height)
    axes.set_xlim(0, max(width, right))
    axes.set_ylim(max(height, bottom), 0)
    axes.set_facecolor("0.85")
    axes.set_xticks([])
    axes.set_yticks([])


def _draw_classes(axes, pixels: np.ndarray, view: dict[str, Any]) -> None:
    """The image and its top-5 classes."""
    _image_axes(axes, pixels)
    height, width = view["image_size"]
    input_h, input_w = view["input_size"]
    axes.set_title(f"{width}x{height} image, model input {input_w}x{input_h}", fontsize=9)
    lines = [f"{item['probability']:6.1%}  {item['name']}" for item in view["top_classes"]]
    axes.set_xlabel("\n".join(lines), fontsize=9, family="monospace", loc="left")


def _draw_cam(axes, pixels: np.ndarray, cam: dict[str, Any]) -> None:
    """The Grad-CAM of the top class over the image, scaled from its minimum to its maximum."""
    _image_axes(axes, pixels)
    heat = np.asarray(cam["map"], dtype=float)
    spread = heat.max() - heat.min()
    heat = (heat - heat.min()) / spread if spread > 0 else np.zeros_like(heat)
    height, width = pixels.shape[:2]
    axes.imshow(
        heat,
        extent=(0, width, height, 0),
        cmap="jet",
        alpha=0.45,
        vmin=0,
        vmax=1,
        interpolation="bilinear",
    )
    axes.set_title(f"Grad-CAM, last stage: {cam['class']}", fontsize=9)


def _draw_agents(axes, pixels: np.ndarray, name: str, block: dict[str, Any]) -> None:
    """The agents of a block: reference grid cells and points, sampled positions, offsets as
    arrows (one colour per offset group)."""
    reference = np.asarray(block["agent_reference"])
    positions = np.asarray(block["agent_positions"])
    _image_axes(axes, pixels, _padded_extent(block))
    _draw_reference_cells(axes, block, reference)
    axes.scatter(
        reference[..., 0],
        reference[..., 1],
        s=10,
        facecolors="none",
        edgecolors="white",
        linewidths=0.6,
    )
    for group, group_positions in enumerate(positions):
        colour = GROUP_COLOURS[group % len(GROUP_COLOURS)]
        offsets = group_positions - reference
        axes.quiver(
            reference[..., 0],
            reference[..., 1],
            offsets[..., 0],
            offsets[..., 1],
            angles="xy",
            scale_units="xy",
            scale=1,
            color=colour,
            width=0.006,
        )
        axes.scatter(
            group_positions[..., 0],
            group_positions[..., 1],
            s=12,
            color=colour,
            edgecolors="black",
            linewidths=0.4,
        )
    agents_h, agents_w = reference.shape[:2]
    groups = f", {block['agent_groups']} offset groups" if block["agent_groups"] > 1 else ""
    axes.set_title(
        f"block {name} (stride {block['stride']}): {agents_w}x{agents_h} agents{groups}",
        fontsize=9,
    )


def _padded_extent(block: dict[str, Any]) -> tuple[float, float]:
    """(x, y) where the block's padded map ends in file pixels: the last region's corner."""
    boxes = np.asarray(block["region_boxes"])
    return float(boxes[-1, 2]), float(boxes[-1, 3])


def _draw_reference_cells(axes, block: dict[str, Any], reference: np.ndarray) -> None:
    """The cells of the reference grid around its (Hk, Wk, 2) `reference` points (file pixels,
    (x, y)): cut halfway between neighbouring points, the outer cells ending at the padded map's
    first and last pixel centres (grid_sample's -1 and 1, align_corners=True)."""
    end_x, end_y = _padded_extent(block)
    padded_h, padded_w = block["padded_size"]
    for centres, end, padded, line in (
        (reference[0, :, 0], end_x, padded_w, axes.axvline),
        (reference[:, 0, 1], end_y, padded_h, axes.axhline),
    ):
        pixel = end / padded  # one map pixel in file pixels
        for edge in [pixel / 2, *(centres[1:] + centres[:-1]) / 2, end - pixel / 2]:
            line(edge, color="white", linewidth=0.4, alpha=0.5)


def _draw_routing(axes, pixels, name: str, block: dict[str, Any], query: list[float]) -> None:
    """The query point, the regions BRA routes its region to (filled), the regions the agents
    around it are routed to (dashed outlines) and its attention over the agents (dot size and
    colour: the mean over each offset group's heads)."""
    from matplotlib.patches import Rectangle

    boxes = np.asarray(block["region_boxes"])
    _image_axes(axes, pixels, _padded_extent(block))
    for x0, y0, x1, y1 in boxes:
        grid = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", alpha=0.7)
        axes.add_patch(grid)
    bra_regions = block["query_routed_regions"]
    for region in [] if bra_regions is None else np.asarray(bra_regions):
        x0, y0, x1, y1 = boxes[region]
        axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, color=BRA_COLOUR, alpha=0.4, lw=0))
    for region in np.asarray(block["agent_routed_regions"]):
        x0, y0, x1, y1 = boxes[region]
        inset = 0.03 * min(x1 - x0, y1 - y0)
        outline = Rectangle(
            (x0 + inset, y0 + inset),
            x1 - x0 - 2 * inset,
            y1 - y0 - 2 * inset,
            fill=False,
            edgecolor=DBRA_COLOUR,
            linestyle="--",
            linewidth=1.4,
        )
        axes.add_patch(outline)
    _draw_attention(axes, block)
    axes.scatter(
        [query[0]],
        [query[1]],
        marker="*",
        s=160,
        color="red",
        edgecolors="white",
        linewidths=0.8,
        zorder=5,
    )
    axes.set_title(f"block {name}: query routing, attention to agents", fontsize=9)


def _legend(figure) -> None:
    """One legend for all panels, below them."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    def marker(label: str, **style) -> Line2D:
        return Line2D([], [], linestyle="", label=label, **style)

    handles = [
        marker("reference point", marker="o", markerfacecolor="none", markeredgecolor="0.3"),
        marker(
            "agent position (colour: offset group)",
            marker="o",
            color=GROUP_COLOURS[0],
            markeredgecolor="black",
        ),
        marker("query point", marker="*", color="red", markersize=12),
        Patch(color=BRA_COLOUR, alpha=0.5, label="BRA: regions the query's region is routed to"),
        Patch(
            fill=False,
            edgecolor=DBRA_COLOUR,
            linestyle="--",
            label="DBRA: regions the agents around the query are routed to",
        ),
        marker(
            "agent: size, colour = query's attention (cyan rim: around the query)",
            marker="o",
            color="#e85362",
            markeredgecolor=DBRA_COLOUR,
            markersize=9,
        ),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)


def _draw_attention(axes, block: dict[str, Any]) -> None:
    """The query's attention over the agents as dots at their positions, per offset group."""
    positions = np.asarray(block["agent_positions"])
    attention = np.asarray(block["query_agent_attention"])
    groups = positions.shape[0]
    per_group = attention.reshape(groups, -1, *attention.shape[1:]).mean(axis=1)
    peak = per_group.max()
    largest = min(160.0, (120 / max(attention.shape[1:])) ** 2)  # dots apart on a ~3 inch panel
    rims = np.where(np.asarray(block["agent_region_mask"]), "#00e5ff", "white").ravel()
    for group_positions, weights in zip(positions, per_group, strict=True):
        axes.scatter(
            group_positions[..., 0],
            group_positions[..., 1],
            s=4 + largest * weights / peak,
            c=weights,
            cmap="magma",
            vmin=0,
            vmax=peak,
            edgecolors=rims,
            linewidths=0.8,
            zorder=4,
        )


# ----------------------------------------------------------------------------- the command


def figure_title(image: Path, loaded: Classifier) -> str:
    """ "IMAGE: MODEL (random weights)", or with the last parts of the weights' path."""
    if loaded.weights == "random":
        return f"{image.name}: {loaded.name} (random weights)"
    return f"{image.name}: {loaded.name}, weights {'/'.join(Path(loaded.weights).parts[-3:])}"


def figure_paths(out: Path, images: Sequence[Path]) -> list[Path]:
    """Where each image's figure goes: `out` for one image; OUT-<image stem>.EXT for several
    (a number added where stems repeat)."""
    if len(images) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{stem}{out.suffix}") for stem in unique_stems(images)]


def show(
    images: Sequence[str | Path],
    out: str | Path,
    *,
    model_name: str | None = None,
    recipe: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    query: tuple[float, float] | None = None,
    blocks: Sequence[str] | None = None,
    size: int | tuple[int, int] | None = None,
    json_path: str | Path | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    console: Console | None = None,
) -> list[Path]:
    """`debiformer show`: for each image a figure (`inspect_image`, `draw_inspection`) at `out`,
    or at OUT-<stem>.EXT for several images; with `json_path` every image's arrays as JSON.
    Every image is read as RGB (`data.images.read_rgb`) before the model is loaded; one with more
    than `max_pixels` pixels is refused from its header. Returns the figure paths."""
    require_matplotlib()
    check_at_least("max_pixels", max_pixels, 1)
    console = console or Console(stderr=True, soft_wrap=True)
    out, image_paths = Path(out), [Path(image) for image in images]
    check_figure_path(out)
    if json_path is not None:
        runtime.check_writable(json_path, "json_path")
    pictures = [read_rgb(path, max_pixels=max_pixels) for path in image_paths]
    loaded = load_classifier(model_name, recipe, checkpoint, pretrained, work="show")
    chosen = choose_blocks(loaded.model, blocks)
    paths, views = figure_paths(out, image_paths), []
    for image_path, picture, path in zip(image_paths, pictures, paths, strict=True):
        view = inspect_image(loaded, picture, chosen, query, size)
        draw_inspection(view, picture, figure_title(image_path, loaded), path)
        views.append({"image": str(image_path), "figure": str(path), **view})
        console.print(f"wrote {path}", highlight=False)
    if json_path is not None:
        runtime.write_json(
            json_path, as_json({"model": loaded.name, "weights": loaded.weights, "images": views})
        )
    return paths
