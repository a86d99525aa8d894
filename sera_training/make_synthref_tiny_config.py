"""Write hub_configs/sera-synthref-tiny: the tiny SERA config and processor used by the default run and the tests.

    python training/make_synthref_tiny_config.py [--output hub_configs/sera-synthref-tiny]

The tokenizer is a byte-level CLIP BPE trained on the synthetic dataset's expressions and captions, so every word
of the built-in data is one or two tokens. The encoders' weights are not written here: see pretrain_encoders.py.
"""

import argparse
from pathlib import Path

from modeling_sera import SeraConfig, SeraImageProcessor, SeraProcessor
from modeling_sera.modeling_sera import AUTO_MAP
from sera_training.build_tokenizer import build_clip_tokenizer
from sera_training.synthetic_data import expression_corpus, generate_pretraining_examples


REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 128
MAX_TEXT_LENGTH = 16
MAX_CAPTION_LENGTH = 48


def tiny_config(tokenizer) -> SeraConfig:
    config = SeraConfig(
        vision_config=dict(
            model_type="dinov2_with_registers",
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            mlp_ratio=4,
            patch_size=8,
            image_size=IMAGE_SIZE,
            num_register_tokens=4,
        ),
        text_config=dict(
            model_type="clip_text_model",
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=len(tokenizer),
            # Room for the whole-scene captions of encoder pretraining; expressions use MAX_TEXT_LENGTH.
            max_position_embeddings=MAX_CAPTION_LENGTH,
            projection_dim=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        adapter_layers=[1, 3],
        adapter_dim=32,
        adapter_num_heads=4,
        vision_feature_layers=[2, 3, 4],
        fusion_router_hidden_size=32,
        # [ours], measured on the default run (BENCHMARKS.md): top-4 of 4 experts is dense, so router noise only
        # blurs the mixing, and the balance and entropy terms read the noise-free weights.
        fusion_router_noise="sparse_only",
        router_regularizer_weights="clean",
        fusion_context_num_heads=4,
        hidden_size=128,
        # A head sized to 4-block encoders and a 16x16 grid [ours]: one decoder layer and a x2 projector cost 0.54x
        # the step of DETRIS's 3 layers and x4 at the same test mIoU (benchmarks/head_cost.py, BENCHMARKS.md).
        decoder_num_layers=1,
        decoder_num_heads=4,
        decoder_intermediate_size=512,
        # The default run sees each expression about once: dropout only slows it (BENCHMARKS.md).
        decoder_dropout=0.0,
        projector_dim=64,
        projector_upsample_factor=2,
        # Objects cover a few percent of a synthref image and the default run is short: BCE alone first learns to
        # predict background everywhere (validation mIoU 3.3 after 125 steps, 24.9 with Dice; BENCHMARKS.md).
        dice_loss_weight=1.0,
    )
    config.architectures = ["SeraForReferringSegmentation"]
    config.auto_map = dict(AUTO_MAP)
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO_ROOT / "hub_configs" / "sera-synthref-tiny"))
    args = parser.parse_args()
    corpus = expression_corpus(seed=0, num_scenes=2000)
    corpus += [example["caption"] for example in generate_pretraining_examples(500, seed=0)]
    tokenizer = build_clip_tokenizer(corpus, vocab_size=1000, model_max_length=MAX_CAPTION_LENGTH)
    longest = max(len(tokenizer(text)["input_ids"]) for text in corpus)
    print(f"tokenizer: {len(tokenizer)} tokens; longest corpus text {longest} tokens (limit {MAX_TEXT_LENGTH})")
    image_processor = SeraImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # The sizes live in the processor only; the config holds the architecture they must fit.
    processor = SeraProcessor(image_processor, tokenizer, max_text_length=MAX_TEXT_LENGTH)
    config = tiny_config(tokenizer)
    processor.check_fits(config)
    processor.save_pretrained(args.output)
    config.save_pretrained(args.output)
    # save_pretrained copies the remote-code files; a config folder keeps none, so they cannot go stale here.
    for copied in Path(args.output).glob("*.py"):
        copied.unlink()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
