"""nomad: crawls reddit /r/all (new), imgur and flickr for good photos and sends them to anti_sus."""
