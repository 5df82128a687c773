"""Ray orchestration: training every category, batch scoring to Parquet."""
