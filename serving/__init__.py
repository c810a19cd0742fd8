"""The inference server: Ray Serve deployments, HTTP and KServe v2 front ends (issue 7).

It will drive `premier.pipeline.PremierPipeline`, whose requests and errors
(`premier.requests`, `premier.errors`) are already shaped for it.
"""
