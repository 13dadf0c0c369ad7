"""Encoders, the decoders, beam search, checkpoints — on random weights and tiny inputs."""
import pytest
import torch

import captionlens as cl
from captionlens.models.encoders import VGG16Encoder, build_encoder

ARCHS = ["adaptive", "gridtd", "transformer"]
WORDS = "a red blue circle square left of".split()


def tiny(arch, encoder="shapes", **kw):
    return cl.build_captioner(arch, encoder=encoder, vocab=WORDS, hidden_size=24, embed_size=16, seed=0, **kw)


def test_vgg16_block5_conv3_grid_is_14x14x512_at_224():
    encoder = VGG16Encoder()
    with torch.no_grad():
        grid = encoder(torch.randn(1, 3, 224, 224))
    assert grid.shape == (1, 512, 14, 14)
    assert (grid >= 0).all()  # block5_conv3 is read after its ReLU, as Keras' layer output
    assert len([m for m in encoder.features if isinstance(m, torch.nn.Conv2d)]) == 13


def test_vgg16_loads_a_torchvision_state_dict_from_a_local_file(tmp_path):
    reference = VGG16Encoder()
    state = {k: torch.randn_like(v) for k, v in reference.state_dict().items()}  # features.0 .. features.28
    state["classifier.0.weight"] = torch.zeros(2, 2)  # the classifier is present in torchvision files
    torch.save(state, tmp_path / "vgg16-397923af.pth")
    encoder = build_encoder("vgg16", tmp_path / "vgg16-397923af.pth")
    assert torch.equal(encoder.features[28].weight, state["features.28.weight"])


def test_missing_weights_fail_clearly_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_encoder("vgg16", tmp_path / "vgg16-397923af.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):
        build_encoder("vgg16", tmp_path / "partial.pth")


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="adaptive, gridtd"):
        tiny("lstm")
    with pytest.raises(ValueError, match="shapes, vgg16"):
        tiny("gridtd", encoder="resnet")


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forcing_contract(arch):
    cap = tiny(arch)
    pixels = cap.preprocess([torch.rand(3, 64, 64), torch.rand(3, 40, 50)])  # resized to the encoder's size
    assert pixels.shape == (2, 3, 64, 64)
    token_ids = torch.tensor([cap.vocab.encode(["a", "red", "circle"]), cap.vocab.encode(["a", "blue", "square"])])
    logits = cap.model(pixels, token_ids)
    assert logits.shape == (2, 5, len(cap.vocab))
    out = cap.model.run(pixels, token_ids)
    assert out.alpha.shape == (2, 5, 64)
    assert out.beta is None if arch == "transformer" else out.beta.shape == (2, 5)  # the sentinel's β
    assert torch.allclose(out.alpha.sum(-1), torch.ones(2, 5))
    # logits[:, t] depends only on tokens up to t: changing a later token leaves earlier scores alone
    changed = token_ids.clone()
    changed[:, 3] = cap.vocab.index("left")
    assert torch.allclose(cap.model(pixels, changed)[:, :3], logits[:, :3])
    assert not torch.allclose(cap.model(pixels, changed)[:, 3:], logits[:, 3:])


@pytest.mark.parametrize("arch", ARCHS)
def test_the_image_changes_the_scores(arch):
    cap = tiny(arch)
    ids = cap.encode(["a", "red", "circle"])
    first = cap.model(torch.randn(1, 3, 64, 64), ids)
    second = cap.model(torch.randn(1, 3, 64, 64), ids)
    assert not torch.allclose(first, second)


def _sequence_log_prob(cap, grid, ids):
    logits = cap.model.decoder(grid, torch.tensor([ids[:-1]])).logits[0]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_scores_and_greedy(arch):
    cap = tiny(arch)
    torch.manual_seed(1)
    with torch.no_grad():
        # make <end> unlikely early so captions have words
        cap.model.decoder.fc.bias[cap.vocab.end_id] -= 2.0
        grids = torch.rand(3, 128, 8, 8)
        captions = cap.caption_features(grids, beam_size=3, max_length=6)
        for caption, grid in zip(captions, grids):
            assert caption.token_ids[0] == cap.vocab.start_id
            assert caption.score == pytest.approx(_sequence_log_prob(cap, grid[None], caption.token_ids), abs=1e-4)
        # beam 1 = greedy argmax decoding (over the tokens a caption may contain)
        greedy = cap.caption_features(grids[:1], beam_size=1, max_length=6)[0]
        ids = [cap.vocab.start_id]
        for _ in range(6):
            logits = cap.model.decoder(grids[:1], torch.tensor([ids])).logits[0, -1]
            logits[[cap.vocab.pad_id, cap.vocab.start_id]] = float("-inf")
            next_id = int(logits.argmax())
            ids.append(next_id)
            if next_id == cap.vocab.end_id:
                break
        assert greedy.token_ids == ids
        assert not {cap.vocab.pad_id} & {t for c in captions for t in c.token_ids}  # never generated
        # a wider beam never finds a less likely caption than greedy
        wide = cap.caption_features(grids[:1], beam_size=5, max_length=6)[0]
        if wide.token_ids[-1] == cap.vocab.end_id and greedy.token_ids[-1] == cap.vocab.end_id:
            assert wide.score >= greedy.score - 1e-5
        # batched across images = one image at a time
        single = [cap.caption_features(grids[i: i + 1], beam_size=3, max_length=6)[0] for i in range(3)]
        assert [c.token_ids for c in single] == [c.token_ids for c in captions]


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_is_data_not_pickle(arch, tmp_path):
    cap = tiny(arch)
    cap.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".captionlens", "config.json", "manifest.json",
                                                                   "model.safetensors", "vocab.json"]
    loaded = cl.load(tmp_path / "run")
    ids = cap.encode(["a", "red", "circle"])
    pixels = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.model(pixels, ids), cap.model(pixels, ids))
    assert loaded.vocab.words == cap.vocab.words and loaded.config == cap.config


def test_load_rejects_other_folders_and_versions(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        cl.load(tmp_path)
    cap = tiny("gridtd")
    cap.save(tmp_path)
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(ValueError, match="config.json is not the file saved"):  # the manifest notices first
        cl.load(tmp_path)
    (tmp_path / "manifest.json").unlink()  # a folder from before manifests: still checked field by field
    with pytest.warns(UserWarning, match="no manifest.json"), pytest.raises(ValueError, match="format_version"):
        cl.load(tmp_path)


def test_cuda_requested_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        tiny("gridtd", device="cuda")


def test_bad_images_raise_clear_errors(tmp_path):
    from captionlens.data.images import ImageLoadError

    cap = tiny("adaptive")
    (tmp_path / "not-an-image.png").write_text("hello")
    with pytest.raises(ImageLoadError, match="cannot read"):
        cap.preprocess([tmp_path / "not-an-image.png"])
    with pytest.raises(ImageLoadError, match="no image file"):
        cap.preprocess([tmp_path / "missing.png"])


def test_shapes_encoder_cells_see_a_28_pixel_window():
    """Each cell of the shapes grid depends on a 28-pixel window around its own 8 pixels only (3×3
    convolutions and pools up to the third pool, 1×1 convolutions after), so attending to a cell
    means looking at what lies there."""
    from captionlens.models.encoders import ShapesEncoder

    torch.manual_seed(0)
    encoder = ShapesEncoder()
    pixels = torch.rand(4, 3, 64, 64, requires_grad=True)
    encoder(pixels)[:, :, 4, 4].sum().backward()  # cell (4, 4) covers pixels 32..39 of each axis
    rows, cols = pixels.grad.abs().sum((0, 1)).nonzero(as_tuple=True)
    for seen in (rows, cols):
        assert seen.min() >= 32 - 10 and seen.max() <= 39 + 10  # 10 px either side: 28 in all
        assert seen.max() - seen.min() + 1 > 8  # more than the cell's own pixels


def test_shapes_weights_of_another_layout_are_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    from captionlens.models.encoders import ShapesEncoder, vgg_stack

    previous = vgg_stack([16, 16, "M", 32, 32, "M", 64, 64, "M", 128, 128])  # the first release's layout
    save_file({f"encoder.features.{k}": v for k, v in previous.state_dict().items()}, str(tmp_path / "old.safetensors"))
    with pytest.raises(ValueError, match="layout revision"):
        ShapesEncoder().load_pretrained(tmp_path / "old.safetensors")


@pytest.mark.parametrize("arch", ["adaptive", "gridtd"])
def test_global_dropout_withholds_v_g_in_training_only(arch, tmp_path):
    cap = tiny(arch, architecture_options={"global_dropout": 0.7})
    plain = tiny(arch)
    decoder, grid = cap.model.decoder, torch.randn(2000, 128, 8, 8)
    with torch.no_grad():
        given = plain.model.decoder.prepare(grid).global_feature  # the same weights: same seed
        decoder.train()
        torch.manual_seed(1)
        withheld = decoder.prepare(grid).global_feature
        decoder.eval()
        evaluated = decoder.prepare(grid).global_feature
    zero = (withheld == 0).all(1)
    assert 0.65 < zero.float().mean() < 0.75
    assert torch.equal(withheld[~zero], given[~zero])  # the rest pass unchanged, not rescaled
    assert torch.equal(evaluated, given)  # inference is the papers' architecture
    cap.save(tmp_path / "run")  # the option is data in config.json
    assert cl.load(tmp_path / "run").model.decoder.global_dropout == 0.7
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="global_dropout"):
            tiny(arch, architecture_options={"global_dropout": bad})
    with pytest.raises(ValueError, match="takes no option global_dropout"):
        tiny("transformer", architecture_options={"global_dropout": 0.5})


@pytest.mark.parametrize("name, encoder", [("broken.safetensors", "shapes"), ("broken.pth", "vgg16")])
def test_corrupt_encoder_weights_are_a_clear_error(tmp_path, name, encoder):
    (tmp_path / name).write_bytes(b"\x93not a weights file" * 5)
    with pytest.raises(ValueError, match="truncated, corrupt or not a tensor-only state dict"):
        build_encoder(encoder, tmp_path / name)


def test_with_model_wraps_another_model_and_leaves_the_original_alone():
    import copy

    cap = tiny("adaptive")
    changed = copy.deepcopy(cap.model)
    with torch.no_grad():
        changed.decoder.fc.bias.add_(1.0)
    other = cap.with_model(changed)
    assert type(other) is type(cap) and other.vocab is cap.vocab and other.config == cap.config
    assert other.model is changed and cap.model is not changed
    ids, pixels = cap.encode(["a", "red", "circle"]), torch.randn(1, 3, 64, 64)
    assert torch.allclose(other.model(pixels, ids), cap.model(pixels, ids) + 1.0, atol=1e-5)


def test_every_architecture_declares_how_it_trains_and_what_it_needs():
    from captionlens.models.registry import ARCHITECTURES

    for name, registered in ARCHITECTURES.items():
        assert isinstance(registered.trained_from_pixels, bool), name
        registered.check_installed()  # the dev install has every extra: none raises
    assert [n for n, r in ARCHITECTURES.items() if r.trained_from_pixels] == ["vit-gpt2"]
