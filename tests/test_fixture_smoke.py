import json


def test_tiny_sd_folder_has_the_diffusers_layout(tiny_sd):
    folder, pipe = tiny_sd
    index = json.loads((folder / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and (folder / part).is_dir()
    assert (folder / "tokenizer" / "vocab.json").exists()
