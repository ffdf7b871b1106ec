"""The learning-curve plot of a GradNet fit (matplotlib, Agg, PNG).

Neighbours: :mod:`.training` (whose history it draws), :mod:`.pipelines`
(:func:`~.pipelines.save_fit` writes it beside the model).
"""


def save_learning_curve(history, path):
    """Plot test accuracy and train loss against iterations into a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    iterations = [h['iteration'] for h in history]
    fig, accuracy_axis = plt.subplots(figsize=(6, 4))
    accuracy_axis.plot(iterations, [h['test_accuracy'] for h in history],
                       'o-', color='tab:blue', label='test accuracy')
    accuracy_axis.set_xlabel('iteration')
    accuracy_axis.set_ylabel('test accuracy (all candidates)')
    loss_axis = accuracy_axis.twinx()
    loss_axis.plot(iterations, [h['train_loss'] for h in history], 's--',
                   color='tab:red', label='train loss')
    loss_axis.set_ylabel('train loss')
    fig.legend(loc='lower center', ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
