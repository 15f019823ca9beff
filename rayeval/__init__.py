"""rayeval: distributed LLM evaluation (benchmark sensitivity) and learned routing on Ray.

Data flows one way: dataset -> perturb -> prompt -> score -> metrics -> preference data
-> router -> serve.  Each stage is a small pure module; Ray is the runtime around them.
"""

__version__ = "0.1.0"
