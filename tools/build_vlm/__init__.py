"""Build the embedded VLM's trained weights (the vision tower, the connector and four token rows around the frozen
SmolLM2-135M-Instruct): ``python -m tools.build_vlm`` from a source checkout. The wheel ships the result in
``hificl/embedded/assets``; `hificl.embedded.load_embedded_vlm` only assembles it."""
