"""`lora-lab install-desktop`: a freedesktop launcher so LoRA-Lab starts by double-click."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from resources import resource_path


def register(sub) -> None:
    parser = sub.add_parser("install-desktop", help="write a .desktop launcher (menu and desktop icon)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write it (default: ~/.local/share/applications, and ~/Desktop if present)")
    parser.set_defaults(func=_install)


def desktop_entry(python: str, icon: Path) -> str:
    return "\n".join([
        "[Desktop Entry]", "Type=Application", "Name=LoRA-Lab",
        "Comment=Fine-tune LoRA adapters on your own GPU and chat with them",
        f"Exec={python} -m app", f"Icon={icon}", "Terminal=false", "Categories=Development;Science;",
        "StartupWMClass=lora-lab", ""])


def _install(args) -> int:
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    targets = [args.dir] if args.dir else [data_home / "applications"]
    desktop = Path.home() / "Desktop"
    if args.dir is None and desktop.is_dir():
        targets.append(desktop)
    icon_dir = data_home / "icons" / "hicolor" / "scalable" / "apps"
    icon_dir.mkdir(parents=True, exist_ok=True)
    icon = icon_dir / "lora-lab.svg"
    shutil.copyfile(resource_path("lora-lab.svg"), icon)
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "lora-lab.desktop"
        path.write_text(desktop_entry(sys.executable, icon), encoding="utf-8")
        path.chmod(0o755)   # desktops only launch entries marked executable
        print(path)
    return 0
