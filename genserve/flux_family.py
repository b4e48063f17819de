"""The standard FLUX.1-dev family's configs: public facts, written down so nothing needs the weights.

Used by ``python -m genserve plan`` when no weights are configured (a team sizes hardware before it has any) and by
``tools/gpu_check.py``, which builds full-size random-weight models from them on a GPU. Every value is the one in
the published ``config.json`` of the model named beside it (black-forest-labs/FLUX.1-dev and FLUX.1-Fill-dev on
the Hugging Face hub, Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro, black-forest-labs/FLUX.1-Redux-dev, whose
image encoder is google/siglip-so400m-patch14-384's vision tower); parameter counts in the comments come from
instantiating them on the meta device and are checked by tests/unit/test_memory_plan.py.
"""

from __future__ import annotations

from typing import Any

# transformer/config.json of FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128. 11.90 B parameters.
TRANSFORMER: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# transformer/config.json of FLUX.1-Fill-dev: the same with the packed mask and masked image as extra input channels.
FILL_TRANSFORMER: dict[str, Any] = {**TRANSFORMER, "in_channels": 384, "out_channels": 64}

# Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro: 5 double + 10 single blocks, 10 control modes. 3.30 B parameters.
CONTROLNET_UNION: dict[str, Any] = {
    **TRANSFORMER,
    "_class_name": "FluxControlNetModel",
    "num_layers": 5,
    "num_single_layers": 10,
    "num_mode": 10,
}

# text_encoder_2/config.json: the T5 v1.1 XXL encoder. 4.76 B parameters (the token embedding counted once).
T5_XXL: dict[str, Any] = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

# text_encoder/config.json: CLIP ViT-L/14's text tower. 123 M parameters.
CLIP_L: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# vae/config.json: 16 latent channels, 8x scale factor. 83.8 M parameters.
VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

# black-forest-labs/FLUX.1-Redux-dev image_encoder/config.json: google/siglip-so400m-patch14-384's vision tower
# (SiglipVisionModel, with its attention-pooling head), as transformers' SiglipVisionConfig saves it. 384 px, patch 14:
# 729 image tokens, 1152 wide. 428.2 M parameters.
SIGLIP_SO400M: dict[str, Any] = {
    "architectures": ["SiglipVisionModel"],
    "attention_dropout": 0.0,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "image_size": 384,
    "intermediate_size": 4304,
    "layer_norm_eps": 1e-06,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 27,
    "patch_size": 14,
    "vision_use_head": True,
}

# FLUX.1-Redux-dev image_embedder/config.json: the ReduxImageEncoder, SigLIP's 1152 -> 3 x 4096 -> 4096 (T5 wide),
# so its tokens join the prompt's. 64.5 M parameters.
REDUX_EMBEDDER: dict[str, Any] = {
    "_class_name": "ReduxImageEncoder",
    "redux_dim": 1152,
    "txt_in_features": 4096,
}

# Planner component name -> its config.
FAMILY: dict[str, dict[str, Any]] = {
    "transformer": TRANSFORMER,
    "fill": FILL_TRANSFORMER,
    "controlnet": CONTROLNET_UNION,
    "text_encoder": CLIP_L,
    "text_encoder_2": T5_XXL,
    "vae": VAE,
    "redux_image_encoder": SIGLIP_SO400M,
    "redux_image_embedder": REDUX_EMBEDDER,
}
FAMILY_NAME = "FLUX.1-dev family (public configs: FLUX.1-dev, FLUX.1-Fill-dev, ControlNet-Union-Pro, FLUX.1-Redux-dev)"
