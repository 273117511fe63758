"""Overrides that turn the demo recipe into a seconds-long run on sklearn digits (8 px)."""

DIGITS = ["data.source=digits:", "data.source_val_split=val", "data.image_size=8", "data.shard_size=500",
          "data.ffcv=false", "data.mean=[0.3]", "data.std=[0.4]", "data.shuffle_buffer=500", "threads=1",
          "teacher.mode=supervised", "teacher.epochs=3", "teacher.batch_size=64", "synth.ipc=2",
          "synth.ipc_per_unit=1", "synth.class_block=5", "synth.scdd.iterations=5", "synth.scdd.jitter=1",
          "eval.epochs=2", "eval.batch_size=10", "eval.seeds=[0]", "relabel.crop_scale=[0.5,1.0]",
          "cluster.backend=local"]
