"""llmc compiler: pure Python, never imports torch."""
