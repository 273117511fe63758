"""Soft labels: a replayable augmentation stream (crops.py), `online` labels from a
frozen teacher, and `stored` labels (crop parameters + top-k fp16 logits) with
merge, replay, save and load (relabel.py). See METHODS.md section 1, "Relabel".
"""
from .crops import (CROP_RATIO, MIX_MODES, apply_crops, apply_mix, augment_batch, box_pixels,  # noqa: F401
                    check_relabel_config, crop_box, crop_boxes, epoch_batches, mix_params, normalise_images)
from .relabel import (FILL_VALUE, FORMAT, OnlineLabeler, StoredLabeler, full_logits_bytes_per_image_epoch,  # noqa: F401
                      load_labels, measured_bytes_per_image_epoch, merge_labels, relabel_stored, save_labels,
                      stored_bytes_per_image_epoch)
