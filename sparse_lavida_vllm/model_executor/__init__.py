"""Models, the attention seam and weight loading; no vLLM import at module level."""
