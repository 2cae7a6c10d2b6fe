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
