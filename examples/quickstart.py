import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import mcmi_torch

torch.manual_seed(0)
x = torch.randn(2048, 16)  # toy data: 10 classes, the label is the largest of 10 noisy features
y = (x[:, :10] + 0.5 * torch.randn(2048, 10)).argmax(1)
loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
teacher = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 10))


def train(criterion, epochs, lr):
    opt = torch.optim.SGD(teacher.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        for inputs, targets in loader:
            loss = criterion(teacher(inputs), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()


train(nn.CrossEntropyLoss(), epochs=10, lr=0.05)  # an ordinary teacher
before = mcmi_torch.metrics.teacher_report(teacher, loader, num_classes=10, progress=False)

# The MCMI recipe: class centroids of the trained teacher, once, then frozen;
# fine-tune on CE - lam * CMI (the one-line change: swap the criterion; the same
# objective as F.cross_entropy(logits, y) + lam * mcmi_torch.mcmi(logits, y, centroids=Q)).
Q = mcmi_torch.estimate_centroids(teacher, loader, num_classes=10, progress=False)
train(mcmi_torch.MCMILoss(lam=0.25, centroids=Q), epochs=3, lr=0.05)
after = mcmi_torch.metrics.teacher_report(teacher, loader, num_classes=10, progress=False)
for name in ("cmi", "accuracy"):  # the teacher before and after its MCMI fine-tune
    print(f"{name}: {getattr(before, name):.3f} -> {getattr(after, name):.3f}")
