"""The diffadapt studio (Gradio app); run ``python ui/studio.py`` or ``diffadapt studio``."""
