"""The device profiles (*.json), shipped as the package data `ondevice.profiles_data`; see README.md."""
