"""Training (stage 1: adapters + training users) and fitting (stage 2: new users) on prepared data.

Data flow: raw user folders (`dataset`) -> `premier data prepare` encodes them once into
safetensors shards (`prepared`) -> `stage1` trains on the shards without running any encoder
-> `stage2` fits new users against a stage-1 checkpoint and writes a `UserRecord`; `fit` is
stage 2 as one library call (images and captions in, the record out). `collectives` holds the
N-worker collectives of stage 1 and `distributed` launches it on Ray Train.
"""
