//! Dataset pipeline (placeholder).
