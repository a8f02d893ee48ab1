"""The memory and cube API (``/v1/memories``, ``/v1/cubes``): protocol and routes."""
