"""Config fields several stages read."""

# Everything that decides what the frozen backbone computes for an image. The weights themselves
# enter digests by content (`ucad.backbone.backbone_identity`), not by `weights_file`'s path.
BACKBONE_FIELDS = (
    "backbone",
    "pretrained",
    "backbone_args",
    "feature_layer",
    "image_size",
    "resize",
)

# Images per forward pass outside training. Rows are independent in exact arithmetic, but CPU
# matrix products may round differently for another row count (seen with 5-token images at 3
# against 32 images per pass, AMD EPYC with AVX-512): what a stage that batches images through
# the backbone computes depends on it in the last bits, so its digest names it.
BATCHED_BACKBONE_FIELDS = (*BACKBONE_FIELDS, "inference_batch_size")
