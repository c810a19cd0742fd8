"""The inference server (issue 7): a Ray Serve application, `premier serve`.

Reading order for one request: `ingress` (HTTP /v1, KServe v2 HTTP and gRPC, auth, admission,
metrics) -> `generator` (`@serve.batch`, many users per forward) -> `premier.pipeline`.
Around them: `config` (pydantic, YAML + environment), `app` (the deployment graph, and the
builder named by `serve_config.yaml`), `kserve` (v2 tensors and metadata), `grpc_stubs`
(tritonclient's stubs made picklable), `metrics` (Prometheus), `auth`, `server` (start and
stop, shared by the CLI, the demo and the tests), `demo`, `cli`; fitting as Ray jobs in
`fitting` and `fit_job`. Nothing heavy is imported by this package itself.
"""
