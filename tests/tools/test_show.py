"""`debiformer show`: agents, routing, attention and Grad-CAM of debiformer_nano at small sizes
(random weights, CPU), and the capture that records them at no cost when off."""

import gc
import json
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import debiformer
from debiformer import routing
from debiformer.data.images import MAX_IMAGE_PIXELS, read_rgb
from debiformer.model import DeformableBiLevelRoutingAttention
from debiformer.routing import pad_to_regions, to_regions
from debiformer.tools.classifier import load_classifier
from debiformer.tools.show import AttentionCapture, choose_blocks, inspect_image
from tests.helpers.image_files import huge_png

pytest.importorskip("matplotlib")


def nano(offset_scale: float = 0.0) -> torch.nn.Module:
    """debiformer_nano, 10 classes, with the offset networks' last layers zeroed (the agents stay
    at their reference points) or drawn from a normal of std `offset_scale`."""
    torch.manual_seed(0)
    model = debiformer.create_model("debiformer_nano", num_classes=10).eval()
    for module in model.modules():
        if isinstance(module, DeformableBiLevelRoutingAttention):
            last_layer = module.offset_net[-1].weight
            if offset_scale:
                torch.nn.init.normal_(last_layer, std=offset_scale)
            else:
                torch.nn.init.zeros_(last_layer)
    return model


@pytest.fixture(scope="module")
def moving_agents(tmp_path_factory):
    """A 131x97 photo-like image (its stage maps need padding) and a checkpoint whose agents
    move."""
    folder = tmp_path_factory.mktemp("show")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)).save(folder / "a.png")
    torch.save(nano(offset_scale=0.5).state_dict(), folder / "moving.pt")
    return folder


def show_json(run_main, folder, image, **options):
    """Runs `debiformer show IMAGE --model debiformer_nano --OPTION VALUE ...` with the figure and
    JSON in `folder`; returns the image's JSON record."""
    arguments = [str(image), "--model", "debiformer_nano", "--out", str(folder / "fig.png")]
    arguments += ["--json", str(folder / "show.json")]
    for option, value in options.items():
        arguments += [f"--{option}", str(value)]
    code, _, err = run_main("show", *arguments)
    assert code == 0, err
    assert (folder / "fig.png").stat().st_size > 10_000
    return json.loads((folder / "show.json").read_text())["images"][0]


def show_moving(run_main, folder, **options):
    """`show_json` of the `moving_agents` image at its own size, with its checkpoint."""
    image, checkpoint = folder / "a.png", folder / "moving.pt"
    return show_json(run_main, folder, image, checkpoint=checkpoint, size=97, **options)


def test_zero_offsets_leave_every_agent_at_its_grid_cell_centre(run_main, tmp_path):
    torch.save(nano(offset_scale=0.0).state_dict(), tmp_path / "still.pt")
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "img.png")
    view = show_json(
        run_main,
        tmp_path,
        tmp_path / "img.png",
        checkpoint=tmp_path / "still.pt",
        size=64,
        blocks="all",
    )
    assert list(view["blocks"]) == ["1.1", "2.1", "3.1", "3.2", "4.1"]
    for block in view["blocks"].values():
        positions = np.array(block["agent_positions"])  # (groups, Hk, Wk, (x, y))
        agents_h, agents_w = positions.shape[1:3]
        (map_h, map_w), (padded_h, padded_w) = block["map_size"], block["padded_size"]
        pixel_x, pixel_y = 64 / map_w, 64 / map_h
        # the cells split the padded map between its first and last pixel centres
        xs = pixel_x * (0.5 + (np.arange(agents_w) + 0.5) / agents_w * (padded_w - 1))
        ys = pixel_y * (0.5 + (np.arange(agents_h) + 0.5) / agents_h * (padded_h - 1))
        centres = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)
        np.testing.assert_allclose(positions, np.broadcast_to(centres, positions.shape), atol=1e-4)


def test_agents_move_with_a_trained_offset_network_and_padding_works(run_main, moving_agents):
    view = show_moving(run_main, moving_agents)
    assert view["input_size"] == [97, 131] and view["image_size"] == [97, 131]
    assert list(view["blocks"]) == ["1.1", "2.1", "3.2", "4.1"]  # each stage's last block
    first = view["blocks"]["1.1"]
    assert first["map_size"] == [25, 33] and first["padded_size"] == [26, 34]
    moved = np.abs(np.array(first["agent_positions"]) - np.array(first["agent_reference"]))
    assert moved.max() > 1.0
    assert len(view["top_classes"]) == 5
    assert np.array(view["grad_cam"]["map"]).shape == (4, 5)


def test_query_attention_over_the_agents_sums_to_one(run_main, moving_agents):
    view = show_moving(run_main, moving_agents, query="100,20")
    assert view["query"] == [100.0, 20.0]
    for block in view["blocks"].values():
        attention = np.array(block["query_agent_attention"])  # (heads, Hk, Wk)
        assert attention.min() >= 0
        np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, atol=1e-5)


def region_holding(pixel: tuple[int, int], size: tuple[int, int], regions_per_side: int) -> int:
    """The region that `pad_to_regions` and `to_regions` put `pixel` (row, column) of an (h, w)
    map into."""
    marker = torch.zeros(1, *size, 1)
    marker[0, pixel[0], pixel[1]] = 1
    regions = to_regions(pad_to_regions(marker, regions_per_side), regions_per_side)
    return int(regions.sum(dim=(2, 3))[0].argmax())


def test_the_geometry_drawn_is_the_one_the_model_used(moving_agents, monkeypatch):
    """At 131x97 every stage map needs padding. The agent positions, padded maps, regions and
    agent cells of show's view are those of the tensors DBRA's grid_sample and `to_regions` got."""
    loaded = load_classifier("debiformer_nano", checkpoint=moving_agents / "moving.pt")
    sizes, used = {}, {}
    real_sample = DeformableBiLevelRoutingAttention._sample

    def sample(module, x, positions):
        used[module] = (tuple(x.shape[1:3]), positions.detach()[0 : module.offset_groups].double())
        return real_sample(module, x, positions)

    monkeypatch.setattr(DeformableBiLevelRoutingAttention, "_sample", sample)
    blocks = choose_blocks(loaded.model, ["all"])

    def record_size(module, args):
        sizes[module] = tuple(args[0].shape[1:3])

    for block in blocks:
        loaded.model.get_submodule(block.dbra).register_forward_pre_hook(record_size)
    query = (120.0, 90.0)
    image = read_rgb(moving_agents / "a.png")
    view = inspect_image(loaded, image, blocks, query=query, size=97)
    for block in blocks:
        shown, module = view["blocks"][block.name], loaded.model.get_submodule(block.dbra)
        (padded_h, padded_w), positions = used[module]
        map_h, map_w = sizes[module]
        assert (shown["map_size"], shown["padded_size"]) == ([map_h, map_w], [padded_h, padded_w])
        assert (padded_h, padded_w) != (map_h, map_w)
        pixel_x, pixel_y = 131 / map_w, 97 / map_h
        # grid_sample, align_corners=True: -1 and 1 are the first and last pixel centres
        xs = ((positions[..., 1] + 1) / 2 * (padded_w - 1) + 0.5) * pixel_x
        ys = ((positions[..., 0] + 1) / 2 * (padded_h - 1) + 0.5) * pixel_y
        expected = torch.stack([xs, ys], dim=-1).numpy()
        np.testing.assert_allclose(shown["agent_positions"], expected, atol=1e-6)
        row, column = int(query[1] // pixel_y), int(query[0] // pixel_x)
        assert shown["query_map_pixel"] == [row, column]
        regions = module.n_win
        assert shown["query_region"] == region_holding((row, column), (map_h, map_w), regions)
        x0, y0, x1, y1 = np.array(shown["region_boxes"])[shown["query_region"]]
        assert x0 <= query[0] < x1 and y0 <= query[1] < y1
        np.testing.assert_allclose(
            shown["region_boxes"][-1][2:], [padded_w * pixel_x, padded_h * pixel_y]
        )
        reference = np.array(shown["agent_reference"])  # (Hk, Wk, (x, y))
        centre = ((column + 0.5) * pixel_x, (row + 0.5) * pixel_y)
        cell = shown["agent_cell"]
        assert cell[0] == np.abs(reference[:, 0, 1] - centre[1]).argmin()
        assert cell[1] == np.abs(reference[0, :, 0] - centre[0]).argmin()
        agents = reference.shape[:2]
        assert shown["agent_region"] == region_holding(tuple(cell), agents, regions)
        mask = np.array(shown["agent_region_mask"])
        assert mask[tuple(cell)] and mask.shape == agents


def hand_set_routing(regions: int, topk: int) -> list[list[int]]:
    """Each of `regions` regions routed to the next `topk` regions, wrapping round."""
    return [[(region + 1 + j) % regions for j in range(topk)] for region in range(regions)]


def test_the_regions_are_the_routing_the_model_used(run_main, moving_agents, monkeypatch):
    """`route` (the top-k) is replaced by `hand_set_routing`."""

    def route(query_regions, key_regions, topk, scale):
        index = torch.tensor(hand_set_routing(query_regions.shape[1], topk))
        return index.expand(query_regions.shape[0], -1, -1)

    monkeypatch.setattr(routing, "route", route)
    view = show_moving(run_main, moving_agents, query="120,90")
    for name, block in view["blocks"].items():
        regions = block["regions_per_side"] ** 2
        assert block["query_region"] == regions - 1, name  # the bottom-right region
        agent_routing = hand_set_routing(regions, len(block["agent_routed_regions"]))
        assert block["agent_routing"] == agent_routing, name
        assert block["agent_routed_regions"] == agent_routing[block["agent_region"]], name
        if block["bra"] is not None:
            bra_routing = hand_set_routing(regions, len(block["query_routed_regions"]))
            assert block["bra_routing"] == bra_routing, name
            assert block["query_routed_regions"] == bra_routing[regions - 1], name


def test_a_grayscale_image_works(run_main, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "item.png")
    view = show_json(run_main, tmp_path, tmp_path / "item.png", size=32)
    assert view["input_size"] == [32, 32] and view["image_size"] == [28, 28]


@pytest.mark.slow
def test_several_images_get_one_figure_each(run_main, tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (40, 32), name == "a" and "red" or "blue").save(tmp_path / f"{name}.png")
    code, _, err = run_main(
        "show",
        str(tmp_path / "a.png"),
        str(tmp_path / "b.png"),
        "--model",
        "debiformer_nano",
        "--size",
        "32",
        "--out",
        str(tmp_path / "f.png"),
    )
    assert code == 0, err
    assert "f-a.png" in err and "f-b.png" in err
    assert (tmp_path / "f-a.png").exists() and (tmp_path / "f-b.png").exists()


@pytest.mark.parametrize(
    ("make", "arguments", "message"),
    [
        (None, ["missing.png"], "error: image {tmp}/missing.png does not exist"),
        ("text", ["bad.png"], "error: image {tmp}/bad.png is not a readable image"),
        ("image", ["ok.png", "--blocks", "9.1"], "error: --blocks: no block '9.1' in this model"),
        ("image", ["ok.png", "--query", "500,3"], "error: --query 500,3: outside the 32x32 image"),
        (
            "huge",
            ["huge.png"],
            "error: image {tmp}/huge.png is 100000x100000 (10000000000 pixels), above the limit "
            f"of {MAX_IMAGE_PIXELS} pixels; shrink it or raise --max-pixels",
        ),
        (
            "image",
            ["ok.png", "--max-pixels", "1000"],
            "error: image {tmp}/ok.png is 32x32 (1024 pixels), above the limit of 1000 pixels; "
            "shrink it or raise --max-pixels",
        ),
        ("image", ["ok.png", "--max-pixels", "0"], "error: --max-pixels must be at least 1, got 0"),
    ],
)
def test_bad_input_is_a_one_line_error(run_main, tmp_path, make, arguments, message):
    if make == "text":
        (tmp_path / "bad.png").write_text("not an image")
    elif make == "image":
        Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    elif make == "huge":
        huge_png(tmp_path / "huge.png", 100_000, 100_000)
    paths = [str(tmp_path / arguments[0]), *arguments[1:]]
    code, _, err = run_main(
        "show", *paths, "--model", "debiformer_nano", "--out", str(tmp_path / "f.png")
    )
    assert code == 2
    assert err.startswith(message.format(tmp=tmp_path)) and len(err.strip().splitlines()) == 1


def tensors_reachable_from(model: torch.nn.Module) -> list[str]:
    """Attributes of the model's modules that hold tensors, besides parameters and buffers."""
    found = []
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            values = value.values() if isinstance(value, dict) else [value]
            if key not in ("_parameters", "_buffers", "_modules") and any(
                isinstance(item, torch.Tensor) for item in values
            ):
                found.append(f"{name}.{key}")
    return found


@pytest.fixture
def frozen_heap():
    """Leaves the objects that exist now out of garbage collections and `gc.get_objects()` until
    the test ends: counting what the test creates takes milliseconds, not seconds."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def live_tensors() -> int:
    """How many tensors exist in this process (outside a frozen heap)."""
    gc.collect()
    return sum(issubclass(type(item), torch.Tensor) for item in gc.get_objects())


def test_without_capture_a_forward_pass_keeps_no_tensor(monkeypatch, frozen_heap):
    model, images = nano(offset_scale=0.5), torch.randn(1, 3, 64, 64)
    routings = []
    real_route = routing.route

    def watched_route(*args):
        index = real_route(*args)
        routings.append(weakref.ref(index))
        return index

    monkeypatch.setattr(routing, "route", watched_route)
    with torch.no_grad():
        model(images)  # warm-up: lazily created state exists from here on
        before = live_tensors()
        model(images)
    assert live_tensors() == before
    assert routings and all(ref() is None for ref in routings)  # nothing kept the indices
    assert tensors_reachable_from(model) == []
    assert routing._recorder is None

    with AttentionCapture(model, ["stages.0.0.attn1", "stages.0.0.attn2"]) as capture:
        model(images)
    assert live_tensors() > before  # the capture holds what it recorded ...
    assert set(capture.records["stages.0.0.attn1"]) == {"region_grid", "region_index"}
    assert set(capture.records["stages.0.0.attn2"]) == {
        "region_grid",
        "region_index",
        "reference_points",
        "agent_positions",
        "agent_grid",
        "query_agent_attention",
    }
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    del capture
    assert live_tensors() == before  # ... and the model nothing


def test_class_names_come_from_the_checkpoint_recipe_or_imagenet(tmp_path):
    from debiformer.recipe import load_recipe, recipe_to_dict

    recipe = recipe_to_dict(load_recipe("quickstart", ["model.arch.depths=[1,1,2,1]"]))
    state = {"format": "debiformer-train/2", "recipe": recipe, "model": nano().state_dict()}
    torch.save(state, tmp_path / "last.pt")
    loaded = load_classifier(checkpoint=tmp_path / "last.pt")
    assert loaded.name == "debiformer_nano" and loaded.preprocessing.size == 32
    assert loaded.class_names[:2] == ["T-shirt/top", "Trouser"]  # torchvision's FashionMNIST
    imagenet = load_classifier(model_name="debiformer_nano")
    assert len(imagenet.class_names) == 1000 and imagenet.class_names[281] == "tabby"


def test_a_checkpoint_of_this_tool_is_shown_without_a_recipe_and_a_recipe_still_wins(
    run_main, tmp_path
):
    from debiformer.checkpoint import save_checkpoint
    from debiformer.weights import ModelSpec, spec_entry

    spec = ModelSpec("debiformer_nano", num_classes=10, preprocessing={"input_size": [3, 48, 48]})
    checkpoint = tmp_path / "last.pt"
    save_checkpoint({"model": nano().state_dict(), **spec_entry(spec)}, checkpoint)
    Image.new("RGB", (40, 32), "gray").save(tmp_path / "img.png")
    code, _, err = run_main(
        "show",
        str(tmp_path / "img.png"),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(tmp_path / "fig.png"),
        "--json",
        str(tmp_path / "show.json"),
    )
    assert code == 0, err
    shown = json.loads((tmp_path / "show.json").read_text())
    assert (shown["model"], shown["weights"]) == ("debiformer_nano", str(checkpoint))
    loaded = load_classifier(checkpoint=checkpoint)
    assert loaded.preprocessing.size == 48 and len(loaded.class_names) == 10
    recipe = tmp_path / "nano40.yaml"
    recipe.write_text("model:\n  name: debiformer_nano\ndata:\n  image_size: 40\n")
    assert load_classifier(recipe=str(recipe), checkpoint=checkpoint).preprocessing.size == 40


def test_a_dense_model_is_refused_in_one_line():
    from debiformer.errors import UserError

    with pytest.raises(UserError, match="show takes classifiers; .* is a detection model"):
        load_classifier(recipe="quickstart_detection", work="show")
