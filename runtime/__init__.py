"""llmc runtime: torch. Its only input from the compiler is the Plan. Import nothing here."""
