"""Ray Serve routing gateway: OpenAI-compatible ingress -> router (-> MiniLM embedder) -> vLLM
deployments.  ``build_app`` (rayeval.serve.app) is the ``serve run`` import path; see docs/serving.md."""
