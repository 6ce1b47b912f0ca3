"""Import a local transformers checkpoint as an anchor run:
`python -m hmem_jax.main.import_hf --hf_dir=MODEL --out=ANCHOR`.

ANCHOR then holds a step-0 checkpoint and `model.gin`; a post-hoc memory run
starts from it with experiments/posthoc_ffn.gin (see that file). With
`--check` the import is verified: transformers and hmem_jax logits on a few
random tokens must agree to 1e-4 (fp32).
"""

from __future__ import annotations

from absl import flags

from hmem_jax.main import common

HF_DIR = flags.DEFINE_string("hf_dir", None, "Local transformers checkpoint folder.", required=True)
OUT = common.out_flag("Folder for the hmem_jax anchor run.", required=True)
CHECK = flags.DEFINE_bool("check", True, "Compare logits with transformers after importing.")


def check_logits(hf_dir: str, cfg, params) -> float:
    """Max |logit difference| between transformers and hmem_jax on random tokens."""
    import numpy as np
    import torch
    import transformers

    from hmem_jax.model import Transformer

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, local_files_only=True, trust_remote_code=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    ours = Transformer(cfg).apply({"params": params}, tokens, np.ones_like(tokens), positions)
    return float(np.abs(np.asarray(ours) - expected).max())


def main(argv: list[str]) -> None:
    from hmem_jax.interop.hf_import import load_hf_anchor, write_anchor_run

    cfg, params = load_hf_anchor(HF_DIR.value)
    if CHECK.value:
        diff = check_logits(HF_DIR.value, cfg, params)
        print(f"logits max |transformers - hmem_jax| = {diff:.2e}", flush=True)
        if diff > 1e-4:
            common.fail(f"The imported anchor's logits differ from transformers' by {diff:.2e}.")
    out = write_anchor_run(OUT.value, cfg, params, HF_DIR.value)
    print(
        f"anchor written to {out} (use --gin_file={out}/model.gin "
        f"--gin_param=\"TrainConfig.init_from = '{out}'\")",
        flush=True,
    )


def run() -> None:
    """The command line entry point."""
    common.run(main)


if __name__ == "__main__":
    run()
