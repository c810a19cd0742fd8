"""Training (stage 1: adapters + training users) and fitting (stage 2: new users) on prepared data.

Data flow: raw user folders (`dataset`) -> `premier data prepare` encodes them once into
safetensors shards (`prepared`) -> `stage1` trains on the shards without running any encoder
-> `stage2` fits new users against a stage-1 checkpoint and writes a `UserRecord`.
"""
