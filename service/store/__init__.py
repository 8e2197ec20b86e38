"""The model store on disk: model directories, class-mean bundles, profiles, the active pointer."""
